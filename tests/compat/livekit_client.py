"""livekit-plugins-openai's realtime model against the server
(`openai.realtime.RealtimeModel(base_url=...)`), driven as LiveKit's AgentSession drives it.

argv: HTTP_BASE_URL PCM24K_FILE (the plugin turns http://host/v1 into ws://host/v1/realtime).
First a greeting (`generate_reply(instructions=...)` before anyone spoke, as LiveKit's
quickstart starts), then a voice turn: the speech pushed as 24 kHz `rtc.AudioFrame`s, the
server's turn detection answers. Then a typed user message added with `update_chat_ctx` and
answered with `generate_reply()`. Reports each generation's messages (text as the plugin streams it,
audio bytes, modalities), the session's `error` events, the plugin's warnings and errors
(it logs a dropped delta as "failed to handle event"), and the final remote chat context.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _report import SAMPLE_RATE, emit, forward_logging, microphone, read_pcm, run
from livekit import rtc
from livekit.agents import llm
from livekit.plugins import openai

TEXT_MESSAGE = "What is the capital of France?"
GREETING = "Greet the user and offer your assistance."


async def collect(generation: llm.GenerationCreatedEvent, out: asyncio.Queue[Any]) -> None:
    """What an agent would play and show: each message's text and audio, to the end."""
    messages = []
    async for message in generation.message_stream:

        async def text(stream: Any) -> str:
            return "".join([str(piece) async for piece in stream])

        async def audio(stream: Any) -> int:
            return sum([len(frame.data) * 2 async for frame in stream])

        spoken, audio_bytes = await asyncio.gather(
            text(message.text_stream), audio(message.audio_stream)
        )
        messages.append(
            {
                "message_id": message.message_id,
                "text": spoken,
                "audio_bytes": audio_bytes,
                "modalities": await message.modalities,
            }
        )
    emit("response", response_id=generation.response_id, messages=messages)
    await out.put(messages)


def chat_items(ctx: llm.ChatContext) -> list[dict[str, Any]]:
    return [
        {"id": item.id, "role": item.role, "text": item.text_content}
        for item in ctx.items
        if item.type == "message"
    ]


async def main(argv: list[str]) -> None:
    base_url, pcm_path = argv[0], argv[1]
    forward_logging()
    model = openai.realtime.RealtimeModel(base_url=base_url, api_key="not-needed")
    session = model.session()
    responses: asyncio.Queue[Any] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    def on_generation(generation: llm.GenerationCreatedEvent) -> None:
        task = asyncio.create_task(collect(generation, responses))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    session.on("generation_created", on_generation)

    def on_error(error: llm.RealtimeModelError) -> None:
        emit("error", error=repr(error.error))
        responses.put_nowait(None)  # the answer being waited for is not coming

    session.on("error", on_error)
    session.on("openai_server_event_received", lambda ev: emit("server_event", type=ev["type"]))

    async def reply(what: str, **options: str) -> bool:
        """`generate_reply()` and the messages it streams; False if it failed."""
        try:
            await session.generate_reply(**options)
        except llm.RealtimeError as exc:
            emit("error", error=f"generate_reply: {exc}")
            emit("turn", what=what, messages=None)
            return False
        messages = await responses.get()
        emit("turn", what=what, messages=messages)
        return messages is not None

    try:
        # LiveKit's quickstart greets first: an answer before anyone said anything.
        if not await reply("greeting", instructions=GREETING):
            return
        answered = asyncio.Event()

        def push(chunk: bytes) -> None:
            samples = len(chunk) // 2
            session.push_audio(
                rtc.AudioFrame(
                    data=chunk, sample_rate=SAMPLE_RATE, num_channels=1, samples_per_channel=samples
                )
            )

        mic = asyncio.create_task(microphone(push, read_pcm(pcm_path), answered))
        messages = await responses.get()
        answered.set()
        await mic
        emit("turn", what="voice", messages=messages)
        if messages is None:
            return

        chat_ctx = session.chat_ctx.copy()
        chat_ctx.add_message(role="user", content=TEXT_MESSAGE)
        try:
            await session.update_chat_ctx(chat_ctx)
        except llm.RealtimeError as exc:
            emit("error", error=f"update_chat_ctx: {exc}")
        await reply("text")
        emit("chat_ctx", items=chat_items(session.chat_ctx))
    finally:
        await session.aclose()
        await model.aclose()


if __name__ == "__main__":
    run(main, float(os.environ.get("VOXTRAL_CLIENT_DEADLINE_S", "120")))
