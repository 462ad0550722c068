"""One conversation, whatever carries it: client events in, turns, the running answer, events out.

Transports (WebSocket, WebRTC) only move bytes: they hand the session client events and
16 kHz audio, and give it a non-blocking `send` for server events. What a turn is lives in
this package, on the event loop: `input` (the audio buffer and server-VAD turns), `response`
(an answer's chunks -> deltas, speech, cancel), `report` (timings and the TTFT log line);
this module dispatches events and owns the session's lifecycle and `session.update`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

import numpy as np

from ...config import Settings
from ...models import vad
from ...models.audio import SAMPLE_RATE, AudioInputError
from ...models.engine import Engine
from ...models.tts import TtsEngine
from ...models.types import Chunk, Conversation, EngineError, Request
from .. import protocol as p
from ..metrics import Metrics, quoted
from ..speech import AudioOut, Speech
from . import report
from .input import (
    InputBuffer,
    InputEvent,
    InputPacer,
    SpeechBegan,
    TurnEnded,
    parse_event,
)
from .response import Answer, settled, sink, speak, status_of
from .settings import SessionSettings

logger = logging.getLogger(__name__)

Transport = p.Transport
_BIG_EVENT_BYTES = 64 * 1024  # parsed off the event loop above this (~2 s of 16 kHz audio)


class Session:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        transport: Transport,
        metrics: Metrics | None = None,
        vad_worker: vad.VadWorker | None = None,
        tts: TtsEngine | None = None,
    ) -> None:
        self.id = p.new_id("sess")
        self.engine = engine
        self.settings = settings
        self.transport = transport
        self.metrics = metrics
        self.tts = tts
        # The transport's way out for speech (None: text only), set by the transport.
        self.audio_out: AudioOut | None = None
        # The server's shared VAD worker; a session made without one (tests) makes its own.
        self._vad_worker = vad_worker
        self._own_vad: vad.VadWorker | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = report.TurnLog(metrics, settings.logging.client_report_wait_ms / 1000)
        self.config = SessionSettings.from_config(settings)  # what session.update changes
        self.conversation = Conversation(settings.conversation.max_turns)
        self.input = InputBuffer(settings.audio.max_utterance_s)
        a = settings.audio
        self._pacer = InputPacer(a.max_input_rate, a.max_utterance_s, time.monotonic)
        self._committed: TurnEnded | None = None  # a user turn awaiting its answer
        self._last_item: str | None = None
        self._answer: Answer | None = None
        self._answer_next = False  # a VAD turn waits for the current answer to end
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.turns = 0

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._use_vad()
        self.transport.send(p.SessionCreated(session=self._state()))
        logger.info("session=%s opened transport=%s", self.id, self.transport.name)

    def close(self) -> None:
        """Cancel what runs; the transport is gone (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._answer is not None:
            # Also ends an answer that is being spoken: its finishing task runs on at once
            # and logs the turn (nothing is sent any more).
            self._answer.stop()
        self._stop_vad()
        if self._own_vad is not None:
            self._own_vad.close()
        self._log.flush()
        logger.info("session=%s closed turns=%d", self.id, self.turns)

    async def wait_closed(self) -> None:
        """After `close()`: until the tasks it stopped (speech, its finishing) have ended."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def responding(self) -> bool:
        return self._answer is not None

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def language(self) -> str | None:
        return self.config.language

    # ----------------------------------------------------------------- client events

    async def handle_text(self, raw: str | bytes) -> None:
        """One client event as received (JSON text)."""
        limit = self.settings.server.max_event_bytes
        size = len(raw)
        # A character is up to 4 UTF-8 bytes; ASCII text (isascii is O(1)) is one byte a character.
        if isinstance(raw, str) and size * 4 > limit and not raw.isascii():
            size = len(raw.encode("utf-8", "surrogatepass"))
        if size > limit:
            self._error(
                "event_too_large",
                f"event of {size} bytes exceeds server.max_event_bytes = {limit}",
            )
            return
        # A big event (seconds of audio) is parsed and decoded on a thread: one client's
        # flood must not hold the event loop that every other session and /healthz share.
        # The caller awaits it, so this session's events stay in order.
        big = size > _BIG_EVENT_BYTES
        try:
            if big:
                event, audio = await asyncio.to_thread(parse_event, raw)
            else:
                event, audio = parse_event(raw)
        except p.ProtocolError as exc:
            self._error(exc.code, str(exc), exc.event_id)
            return
        try:
            await self._dispatch(event, audio)
        except p.ProtocolError as exc:
            self._error(exc.code, str(exc), exc.event_id or event.event_id)

    async def _dispatch(self, event: p.ClientEvent, audio: np.ndarray | None) -> None:
        if isinstance(event, p.SessionUpdate):
            await self._update(event)
        elif isinstance(event, p.InputAudioBufferAppend):
            assert audio is not None
            self.append_audio(audio)
            delay = self._pacer.delay_after(audio.size / SAMPLE_RATE)
            if delay:
                # Faster than audio.max_input_rate: this client's next event waits (its
                # transport reads nothing meanwhile, so its socket pushes back).
                await asyncio.sleep(delay)
        elif isinstance(event, p.InputAudioBufferCommit):
            self._commit(event.event_id)
        elif isinstance(event, p.InputAudioBufferClear):
            self._clear()
        elif isinstance(event, p.ResponseCreate):
            self._create_response(event.event_id)
        elif isinstance(event, p.ResponseCancel):
            self._cancel(event.event_id, event.response_id)
        elif isinstance(event, p.ClientTiming):
            self._log.client_report(event)
        elif isinstance(event, p.ClientFallback):
            logger.info("session=%s client fell back: %s", self.id, quoted(event.reason))
            if self.metrics is not None:
                self.metrics.fallback(self.id, event.reason)

    def append_audio(self, audio: np.ndarray, continuous: bool = False) -> None:
        """16 kHz mono float32 audio from the client, in order.

        `continuous`: a source that never stops (a WebRTC microphone track). In push-to-talk
        its buffer keeps the last `audio.max_utterance_s` instead of overflowing.
        """
        if self.closed:
            return
        self._handle(self.input.append(audio, continuous))

    def _handle(self, events: list[InputEvent]) -> None:
        for event in events:
            if isinstance(event, SpeechBegan):
                self._speech_started(event)
            else:
                self._turn_ended(event)

    def _on_vad(self, stream: vad.VadStream, epoch: int, events: list[vad.VadEvent]) -> None:
        """The VAD worker's verdicts, on the event loop."""
        if self.closed or stream is not self.input.vad or epoch != stream.epoch:
            return  # a stream replaced, reset or closed since: stale
        self._handle(self.input.on_vad(events))

    # ----------------------------------------------------------------- turns

    def _speech_started(self, event: SpeechBegan) -> None:
        td = self.config.turn_detection
        assert td is not None
        self.transport.send(
            p.SpeechStarted(audio_start_ms=event.audio_start_ms, item_id=event.item_id)
        )
        if self._answer is not None and td.interrupt_response:
            logger.info("session=%s barge-in cancels response=%s", self.id, self._answer.id)
            self._answer.stop()

    def _turn_ended(self, turn: TurnEnded) -> None:
        td = self.config.turn_detection
        assert td is not None
        self.transport.send(p.SpeechStopped(audio_end_ms=turn.audio_end_ms, item_id=turn.item_id))
        self._committed_turn(turn)
        if td.create_response:
            if self._answer is not None:
                # The previous answer is still ending (cancelled by this very speech, or
                # running on): this turn starts as soon as its response.done goes out.
                self._answer_next = True
            else:
                self._create_response(None)

    def _commit(self, event_id: str | None) -> None:
        now = time.perf_counter()
        audio = self.input.commit(event_id)
        self._committed_turn(TurnEnded(p.new_id("item"), audio, 0, now))

    def _committed_turn(self, turn: TurnEnded) -> None:
        self.transport.send(p.Committed(item_id=turn.item_id, previous_item_id=self._last_item))
        self._last_item = turn.item_id
        self._committed = turn

    def _clear(self) -> None:
        self._answer_next = False
        self._committed = None
        self.input.clear()
        self.transport.send(p.Cleared())

    # ----------------------------------------------------------------- answers

    def _create_response(self, event_id: str | None) -> None:
        if self._answer is not None:
            raise p.ProtocolError(
                "conversation_already_has_active_response",
                f"response {self._answer.id} is still running; cancel it first",
                event_id,
            )
        turn = self._committed
        if turn is None:
            raise p.ProtocolError(
                "no_committed_audio",
                "nothing to answer: commit the input audio buffer first",
                event_id,
            )
        chat = self.mode == "chat"
        response_id = p.new_id("resp")
        request = Request(
            turn.audio,
            "chat" if chat else "transcribe",
            language=self.config.language,
            instructions=self.config.instructions,
            history=self.conversation.history if chat else (),
            id=response_id,  # the engine's log lines name the response
        )
        loop = self._loop
        assert loop is not None, "start() the session first"

        def current() -> Any:
            answer = self._answer
            return answer.handle if answer is not None and answer.id == response_id else None

        try:
            handle = self.engine.submit(request, sink(loop, self._on_chunk, response_id, current))
        except (AudioInputError, EngineError) as exc:
            # The turn stays committed: a client may retry response.create (e.g. engine_busy).
            self._error(exc.code, str(exc), event_id)
            return
        self._committed = None
        clock = report.TurnClock(turn.at)
        self._answer = Answer(response_id, turn.item_id, handle, turn.audio, clock, self.transport)
        if chat and self.tts is not None and self.audio_out is not None:
            self._answer.speech = self._speech(response_id, turn.item_id)
        self.transport.send(
            p.ResponseCreated(response=p.Response(id=response_id, status="in_progress"))
        )

    def _cancel(self, event_id: str | None, response_id: str | None) -> None:
        if self._answer is None:
            raise p.ProtocolError(
                "response_cancel_not_active", "there is no response to cancel", event_id
            )
        if response_id is not None and response_id != self._answer.id:
            raise p.ProtocolError(
                "response_cancel_not_active",
                f"response {response_id} is not running (running: {self._answer.id})",
                event_id,
            )
        self._answer.stop()

    def _speech(self, response_id: str, item_id: str) -> Speech:
        assert self.tts is not None and self.audio_out is not None

        def failed(code: str, message: str) -> None:
            self._error(code, f"speech stopped: {message}")

        speech = speak(
            self.tts,
            self.audio_out,
            self.settings.tts,
            (response_id, item_id),
            self.transport,
            failed,
        )
        self._tasks.add(speech.task)  # so that wait_closed() covers its synthesis
        speech.task.add_done_callback(self._tasks.discard)
        return speech

    def _on_chunk(self, response_id: str, chunk: Chunk) -> None:
        answer = self._answer
        if answer is None or answer.id != response_id:
            return
        if not chunk.is_final:
            if not self.closed:
                answer.deliver(chunk)
            return
        assert chunk.totals is not None
        speech = answer.speech
        if speech is not None and not speech.cancelled:
            if chunk.totals.status == "completed" and not self.closed:
                # The text is complete; response.done waits until it has been spoken.
                speech.end()
                self._spawn(self._finish_when_spoken(answer, chunk), f"speech-{answer.id}")
                return
            speech.cancel()
        self._finish(answer, chunk)

    async def _finish_when_spoken(self, answer: Answer, chunk: Chunk) -> None:
        assert answer.speech is not None and chunk.totals is not None
        spoken = await answer.speech.finished()
        if self._answer is not answer:
            return
        if not spoken:  # cancelled (barge-in, response.cancel) while it was being spoken
            chunk = replace(chunk, totals=replace(chunk.totals, status="cancelled"))
        self._finish(answer, chunk)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish(self, answer: Answer, chunk: Chunk) -> None:
        assert chunk.totals is not None
        totals = settled(answer, chunk.totals)
        self._answer = None
        self.turns += 1
        if answer.speech is not None:
            answer.clock.first_audio_at = answer.speech.first_audio_at
        text = answer.answer_text
        status = status_of(totals)
        timings = report.timings(
            answer.clock, totals, text, self.transport.name, time.perf_counter()
        )
        if totals.status == "completed" and self.mode == "chat" and text.strip():
            # Only whole answers the client saw; the model refuses an empty assistant turn.
            self.conversation.add(answer.audio, text)
        turn = report.record(self.id, self.turns, self.mode, status, timings, totals)
        self._log.add(answer.id, turn, None if self.closed else self._loop)
        if self.closed:
            return
        answer.send_done(status, totals, timings)
        if totals.status == "error":
            self._error(totals.error_code or "generation_failed", totals.error or "failed")
        if self._answer_next:
            self._answer_next = False
            if self._committed is not None:
                self._create_response(None)

    # ----------------------------------------------------------------- session.update

    async def _update(self, event: p.SessionUpdate) -> None:
        self.config = self.config.updated(event.session, self.settings.vad)
        if "turn_detection" in _fields_set(event):
            await self._use_vad()
        self.transport.send(p.SessionUpdated(session=self._state()))

    async def _use_vad(self) -> None:
        """A VAD stream for the current turn_detection settings, replacing the current one
        (none: push-to-talk)."""
        self._stop_vad()
        td = self.config.turn_detection
        if td is None:
            return
        worker = self._vad_worker
        if worker is None:
            if self._own_vad is None:  # loads a model (~50 ms of CPU): off the event loop
                self._own_vad = await asyncio.to_thread(vad.VadWorker)
            worker = self._own_vad
        if self.closed:  # closed while the model loaded
            return
        loop = self._loop
        assert loop is not None, "start() the session first"

        def on_events(epoch: int, events: list[vad.VadEvent]) -> None:  # VAD worker thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(self._on_vad, stream, epoch, events)

        stream = worker.open(
            td.threshold, td.silence_duration_ms, self.input.stream_samples, on_events
        )
        self.input.use_vad(stream, td.prefix_padding_ms)

    def _stop_vad(self) -> None:
        if self.input.vad is not None:
            self.input.vad.close()
        self.input.use_vad(None)

    def _state(self) -> p.SessionState:
        return self.config.state(self.id, self.settings.model.id)

    def _error(self, code: str, message: str, event_id: str | None = None) -> None:
        if self.metrics is not None:
            self.metrics.error(self.id, code, message)
        else:
            logger.warning("session=%s error code=%s: %s", self.id, code, quoted(message))
        if not self.closed:
            self.transport.send(p.error_event(code, message, event_id))


def _fields_set(event: p.SessionUpdate) -> set[str]:
    audio_in = event.session.audio.input if event.session.audio else None
    return set(audio_in.model_fields_set) if audio_in is not None else set()
