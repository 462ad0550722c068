"""pipecat-ai's OpenAI Realtime service against the server (`OpenAIRealtimeLLMService`,
`base_url` pointed at it), in a pipeline as pipecat's realtime examples build one, with a
simulated loudspeaker as its output transport.

argv: WS_URL PCM24K_FILE. The system prompt is the service's `system_instruction` and the
context starts with a user message, so the service opens the conversation with
`conversation.item.create` for it and answers that first (a context turn); then the speech
goes in as 24 kHz `InputAudioRawFrame`s and the server's turn detection answers it (a voice
turn). When the user starts speaking, pipecat truncates the last answer to what was played
(`conversation.item.truncate`). Reports each response's text as pipecat hands it on
(LLMTextFrames between LLMFullResponseStart/End), its audio, each answer the context
recorded, every ErrorFrame and every warning pipecat logs (a server `error` is fatal to
its service).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _report import SAMPLE_RATE, emit, microphone, read_pcm, run
from loguru import logger
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.realtime.events import SessionProperties
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

SYSTEM = "You are a helpful assistant. Answer briefly."
CONTEXT = [{"role": "user", "content": "Say hello."}]


class Observer(FrameProcessor):
    """Sits after the LLM service: what a pipecat app's next processor would receive."""

    def __init__(self, responses: asyncio.Queue[str | None]) -> None:
        super().__init__()
        self._responses = responses
        self._text: list[str] | None = None
        self._audio_bytes = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMFullResponseStartFrame):
            self._text = []
            self._audio_bytes = 0
        elif isinstance(frame, LLMTextFrame) and self._text is not None:
            self._text.append(frame.text)
        elif isinstance(frame, TTSAudioRawFrame):
            self._audio_bytes += len(frame.audio)
        elif isinstance(frame, LLMFullResponseEndFrame) and self._text is not None:
            text = "".join(self._text)
            emit("response", text=text, audio_bytes=self._audio_bytes)
            self._text = None
            await self._responses.put(text)
        elif isinstance(frame, ErrorFrame):
            emit("error", error=frame.error, fatal=frame.fatal)
            await self._responses.put(None)
        await self.push_frame(frame, direction)


class Speaker(BaseOutputTransport):
    """A loudspeaker that plays in real time into nothing: as every pipecat app has an
    output transport, the service learns when the bot stops speaking (BotStoppedSpeaking)
    and truncates what the user did not hear when they talk over it."""

    def __init__(self) -> None:
        super().__init__(TransportParams(audio_out_enabled=True, audio_out_sample_rate=SAMPLE_RATE))

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        await asyncio.sleep(len(frame.audio) / 2 / frame.sample_rate)  # the time it plays
        return True


async def main(argv: list[str]) -> None:
    url, pcm_path = argv[0], argv[1]
    responses: asyncio.Queue[str | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def on_log(message: Any) -> None:
        """pipecat logs through loguru: every warning goes to the test; an error (a dead
        receive loop logs one) also ends the wait for an answer that will not come."""
        record = message.record
        emit("log", level=record["level"].name, message=record["message"][:4000])
        if record["level"].no >= logger.level("ERROR").no:
            loop.call_soon_threadsafe(responses.put_nowait, None)

    logger.remove()
    logger.add(on_log, level="WARNING")
    logger.add(sys.stderr, level="INFO")
    llm = OpenAIRealtimeLLMService(
        api_key="not-needed",
        base_url=url,
        settings=OpenAIRealtimeLLMService.Settings(
            system_instruction=SYSTEM, session_properties=SessionProperties()
        ),
    )
    context = LLMContext(CONTEXT)
    aggregators = LLMContextAggregatorPair(context)
    recorded: asyncio.Queue[None] = asyncio.Queue()

    @aggregators.assistant().event_handler("on_assistant_turn_stopped")
    async def on_assistant_turn_stopped(_aggregator: Any, message: Any) -> None:
        """An answer was played and went into the context."""
        emit("assistant_turn", content=message.content, interrupted=message.interrupted)
        await recorded.put(None)

    pipeline = Pipeline(
        [aggregators.user(), llm, Observer(responses), Speaker(), aggregators.assistant()]
    )
    worker = PipelineWorker(pipeline, enable_rtvi=False)

    @worker.event_handler("on_pipeline_error")
    async def on_pipeline_error(_worker: Any, frame: ErrorFrame) -> None:
        emit("pipeline_error", error=frame.error)

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    try:
        await worker.queue_frames([LLMContextFrame(context)])
        text = await responses.get()
        emit("turn", what="context", text=text)
        if text is None:
            return
        answered = asyncio.Event()

        async def send(chunk: bytes) -> None:
            frame = InputAudioRawFrame(audio=chunk, sample_rate=SAMPLE_RATE, num_channels=1)
            await worker.queue_frame(frame)

        mic = asyncio.create_task(microphone(send, read_pcm(pcm_path), answered))
        text = await responses.get()
        answered.set()
        await mic
        emit("turn", what="voice", text=text)
        for _ in range(2):  # both answers played and recorded in the context
            await recorded.get()
        emit("context", messages=[dict(m) for m in context.get_messages()])
    finally:
        await worker.cancel()
        await asyncio.gather(running, return_exceptions=True)


if __name__ == "__main__":
    run(main, float(os.environ.get("VOXTRAL_CLIENT_DEADLINE_S", "120")))
