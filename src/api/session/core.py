"""One conversation, whatever carries it: audio in, turns, the running response, events out.

Transports (WebSocket, WebRTC) only move bytes: they hand the session client events and
16 kHz audio, and give it a non-blocking `send` for server events. Everything a turn is
(turn detection, commit, response, cancel, barge-in, timings) lives here, on the event loop.
The engine's chunks arrive from its worker thread through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from ...config import Settings
from ...models import vad
from ...models.audio import SAMPLE_RATE, AudioInputError, pcm16_to_float
from ...models.chunking import ChunkSink
from ...models.engine import Engine
from ...models.types import (
    Chunk,
    Conversation,
    EngineError,
    Request,
    RequestHandle,
    ms_between,
)
from .. import protocol as p
from ..metrics import Metrics, TurnRecord

if TYPE_CHECKING:
    from ...models.tts import TtsEngine
    from ..speech import AudioOut, Speech

logger = logging.getLogger(__name__)

_TAIL_KEEP_S = 0.1  # audio kept after the detected end of speech
_MIN_COMMIT_S = 0.1  # OpenAI's minimum for a committed buffer


class Transport(Protocol):
    name: str

    def send(self, event: p.ServerEvent) -> None:
        """Queue an event for the client; never blocks, never raises."""


@dataclass
class _Response:
    id: str
    item_id: str
    handle: RequestHandle
    audio: np.ndarray
    turn_ended_at: float  # end of speech detected, or commit received
    first_delta_at: float | None = None
    first_token_at: float | None = None  # engine clock (perf_counter, this process)
    first_chunk_out_at: float | None = None
    text: list[str] = field(default_factory=list)
    speech: Speech | None = None  # the answer spoken (chat mode with tts on)


@dataclass
class _TurnDetection:
    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int
    create_response: bool = True
    interrupt_response: bool = True


class Session:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        transport: Transport,
        metrics: Metrics | None = None,
        vad_models: vad.ModelPool | None = None,
        tts: TtsEngine | None = None,
    ) -> None:
        self.id = p.new_id("sess")
        self._vad_models = vad_models
        self.tts = tts
        # The transport's way out for speech (None: text only), set by the transport.
        self.audio_out: AudioOut | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics = metrics
        # The last turn's record waits briefly for the browser's own measurement.
        self._unlogged: tuple[str, TurnRecord, asyncio.TimerHandle] | None = None
        self.engine = engine
        self.settings = settings
        self.transport = transport
        self.mode = settings.mode
        self.language = settings.transcribe.language
        self.instructions = settings.conversation.instructions
        v = settings.vad
        self.turn_detection: _TurnDetection | None = _TurnDetection(
            v.threshold, v.prefix_padding_ms, v.min_silence_ms
        )
        self.conversation = Conversation(settings.conversation.max_turns)
        self._detector: vad.TurnDetector | None = None
        self._buffer = np.zeros(0, np.float32)  # the input audio buffer
        self._buffer_start = 0  # stream offset (samples) of _buffer[0]
        self._stream_samples = 0  # samples received in this session
        self._speech_item: str | None = None
        self._committed: tuple[str, np.ndarray, float] | None = None  # awaiting response.create
        self._last_item: str | None = None
        self._response: _Response | None = None
        self._answer_next = False  # a VAD turn waits for the current response to end
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.turns = 0

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.turn_detection is not None:
            await self._ensure_detector()
        self.transport.send(p.SessionCreated(session=self._state()))
        logger.info("session=%s opened transport=%s", self.id, self.transport.name)

    def close(self) -> None:
        """Cancel what runs; the transport is gone (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._response is not None:
            # Also ends a response that is being spoken: its finishing task runs on at once
            # and logs the turn (nothing is sent any more).
            self._stop_response(self._response)
        self._release_detector()
        self._log_turn()
        logger.info("session=%s closed turns=%d", self.id, self.turns)

    async def wait_closed(self) -> None:
        """After `close()`: until the tasks it stopped (speech, its finishing) have ended."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def responding(self) -> bool:
        return self._response is not None

    # ----------------------------------------------------------------- input

    async def handle_text(self, raw: str | bytes) -> None:
        """One client event as received (JSON text)."""
        limit = self.settings.server.max_event_bytes
        size = len(raw)
        if isinstance(raw, str) and size * 4 > limit:  # a character is up to 4 UTF-8 bytes
            size = len(raw.encode("utf-8", "surrogatepass"))
        if size > limit:
            self._error(
                "event_too_large",
                f"event of {size} bytes exceeds server.max_event_bytes = {limit}",
            )
            return
        try:
            event = p.parse_client_event(raw)
        except p.ProtocolError as exc:
            self._error(exc.code, str(exc), exc.event_id)
            return
        try:
            if isinstance(event, p.SessionUpdate):
                await self._update(event)
            elif isinstance(event, p.InputAudioBufferAppend):
                self._append_base64(event)
            elif isinstance(event, p.InputAudioBufferCommit):
                self._commit(event.event_id)
            elif isinstance(event, p.InputAudioBufferClear):
                self._clear()
            elif isinstance(event, p.ResponseCreate):
                self._create_response(event.event_id)
            elif isinstance(event, p.ResponseCancel):
                self._cancel(event.event_id, event.response_id)
            elif isinstance(event, p.ClientTiming):
                self._client_timing(event)
            elif isinstance(event, p.ClientFallback):
                logger.info("session=%s client fell back: %s", self.id, event.reason)
                if self.metrics is not None:
                    self.metrics.fallback(self.id, event.reason)
        except p.ProtocolError as exc:
            self._error(exc.code, str(exc), exc.event_id or event.event_id)

    def append_audio(self, audio: np.ndarray, continuous: bool = False) -> None:
        """16 kHz mono float32 audio from the client, in order.

        `continuous`: a source that never stops (a WebRTC microphone track). In push-to-talk
        its buffer keeps the last `audio.max_utterance_s` instead of overflowing.
        """
        if self.closed or audio.size == 0:
            return
        if not np.isfinite(audio).all():
            raise p.ProtocolError("invalid_audio", "audio contains NaN or infinite samples")
        self._stream_samples += audio.size
        self._buffer = np.concatenate([self._buffer, audio])
        if self.turn_detection is None or self._detector is None:
            limit = int(self.settings.audio.max_utterance_s * SAMPLE_RATE)
            if self._buffer.size > limit and continuous:
                self._cut_buffer_before(self._stream_samples - limit)
            elif self._buffer.size > limit:
                self._buffer = np.zeros(0, np.float32)
                self._buffer_start = self._stream_samples
                raise p.ProtocolError(
                    "input_audio_buffer_full",
                    "the input audio buffer exceeded audio.max_utterance_s = "
                    f"{self.settings.audio.max_utterance_s:g} s and was cleared",
                )
            return
        for event in self._detector.feed(audio):
            if isinstance(event, vad.SpeechStarted):
                self._speech_started(event.sample)
            else:
                self._speech_stopped(event.sample)
        self._bound_buffer()

    def _append_base64(self, event: p.InputAudioBufferAppend) -> None:
        try:
            pcm = base64.b64decode(event.audio, validate=True)
        except (binascii.Error, ValueError):
            raise p.ProtocolError("invalid_audio", "audio is not valid base64") from None
        try:
            audio = pcm16_to_float(pcm)
        except AudioInputError as exc:
            raise p.ProtocolError("invalid_audio", str(exc)) from None
        self.append_audio(audio)

    # ----------------------------------------------------------------- turns

    def _speech_started(self, sample: int) -> None:
        assert self.turn_detection is not None
        prefix = int(self.turn_detection.prefix_padding_ms * SAMPLE_RATE / 1000)
        self._cut_buffer_before(max(sample - prefix, 0))
        self._speech_item = p.new_id("item")
        self.transport.send(
            p.SpeechStarted(audio_start_ms=sample * 1000 // SAMPLE_RATE, item_id=self._speech_item)
        )
        if self._response is not None and self.turn_detection.interrupt_response:
            logger.info("session=%s barge-in cancels response=%s", self.id, self._response.id)
            self._stop_response(self._response)

    def _speech_stopped(self, sample: int) -> None:
        assert self.turn_detection is not None
        now = time.perf_counter()
        item = self._speech_item or p.new_id("item")
        self._speech_item = None
        self.transport.send(
            p.SpeechStopped(audio_end_ms=sample * 1000 // SAMPLE_RATE, item_id=item)
        )
        end = sample + int(_TAIL_KEEP_S * SAMPLE_RATE) - self._buffer_start
        audio, self._buffer = self._buffer[: max(end, 0)], self._buffer[max(end, 0) :]
        self._buffer_start += audio.size
        self._committed_turn(item, audio, now)
        if self.turn_detection.create_response:
            if self._response is not None:
                # The previous answer is still ending (cancelled by this very speech, or
                # running on): this turn starts as soon as its response.done goes out.
                self._answer_next = True
            else:
                self._create_response(None)

    def _commit(self, event_id: str | None) -> None:
        now = time.perf_counter()
        if self._buffer.size < _MIN_COMMIT_S * SAMPLE_RATE:
            raise p.ProtocolError(
                "input_audio_buffer_commit_empty",
                f"buffer too small: expected at least {_MIN_COMMIT_S * 1000:.0f} ms of audio, "
                f"have {self._buffer.size * 1000 // SAMPLE_RATE} ms",
                event_id,
            )
        audio = self._buffer
        self._buffer_start += audio.size
        self._buffer = np.zeros(0, np.float32)
        if self._detector is not None:
            self._detector.reset()
        self._speech_item = None
        self._committed_turn(p.new_id("item"), audio, now)

    def _committed_turn(self, item: str, audio: np.ndarray, at: float) -> None:
        self.transport.send(p.Committed(item_id=item, previous_item_id=self._last_item))
        self._last_item = item
        self._committed = (item, audio, at)

    def _clear(self) -> None:
        self._answer_next = False
        self._buffer_start = self._stream_samples
        self._buffer = np.zeros(0, np.float32)
        self._committed = None
        if self._detector is not None:
            self._detector.reset()
        self.transport.send(p.Cleared())

    def _cut_buffer_before(self, sample: int) -> None:
        drop = min(max(sample - self._buffer_start, 0), self._buffer.size)
        self._buffer = self._buffer[drop:]
        self._buffer_start += drop

    def _bound_buffer(self) -> None:
        """Idle: keep only what prefix padding may need. Speaking: end the turn at the limit."""
        assert self.turn_detection is not None and self._detector is not None
        if not self._detector.speaking:
            keep = int((self.turn_detection.prefix_padding_ms / 1000 + 1.0) * SAMPLE_RATE)
            self._cut_buffer_before(self._stream_samples - keep)
        elif self._buffer.size >= self.settings.audio.max_utterance_s * SAMPLE_RATE:
            # A monologue longer than the model takes: end the turn here, as if paused. The
            # detector still hears speech, so going on talking is not a barge-in; the rest
            # becomes the next turn when the speaker does pause.
            self._speech_stopped(self._stream_samples)
            self._speech_item = p.new_id("item")

    # ----------------------------------------------------------------- responses

    def _create_response(self, event_id: str | None) -> None:
        if self._response is not None:
            raise p.ProtocolError(
                "conversation_already_has_active_response",
                f"response {self._response.id} is still running; cancel it first",
                event_id,
            )
        if self._committed is None:
            raise p.ProtocolError(
                "no_committed_audio",
                "nothing to answer: commit the input audio buffer first",
                event_id,
            )
        item, audio, turn_ended_at = self._committed
        request = Request(
            audio,
            "chat" if self.mode == "chat" else "transcribe",
            language=self.language,
            instructions=self.instructions,
            history=self.conversation.history if self.mode == "chat" else (),
        )
        response_id = p.new_id("resp")
        try:
            handle = self.engine.submit(request, self._sink(response_id))
        except (AudioInputError, EngineError) as exc:
            # The turn stays committed: a client may retry response.create (e.g. engine_busy).
            self._error(exc.code, str(exc), event_id)
            return
        self._committed = None
        self._response = _Response(response_id, item, handle, audio, turn_ended_at)
        if self.tts is not None and self.audio_out is not None and request.mode == "chat":
            self._response.speech = self._speech(response_id, item)
        self.transport.send(
            p.ResponseCreated(response=p.Response(id=response_id, status="in_progress"))
        )

    def _cancel(self, event_id: str | None, response_id: str | None) -> None:
        if self._response is None:
            raise p.ProtocolError(
                "response_cancel_not_active", "there is no response to cancel", event_id
            )
        if response_id is not None and response_id != self._response.id:
            raise p.ProtocolError(
                "response_cancel_not_active",
                f"response {response_id} is not running (running: {self._response.id})",
                event_id,
            )
        self._stop_response(self._response)

    def _stop_response(self, response: _Response) -> None:
        """Cancel generation and silence the speech; response.done follows."""
        response.handle.cancel()
        if response.speech is not None:
            response.speech.cancel()

    def _speech(self, response_id: str, item_id: str) -> Speech:
        from ..speech import Speech

        assert self.tts is not None and self.audio_out is not None

        def spoken(phrase: str) -> None:
            self.transport.send(
                p.TranscriptDelta(response_id=response_id, item_id=item_id, delta=phrase)
            )

        def failed(code: str, message: str) -> None:
            self._error(code, f"speech stopped: {message}")

        speech = Speech(
            self.tts, self.audio_out, self.settings.tts, (response_id, item_id), spoken, failed
        )
        self._tasks.add(speech.task)  # so that wait_closed() covers its synthesis
        speech.task.add_done_callback(self._tasks.discard)
        return speech

    async def _finish_when_spoken(self, response: _Response, chunk: Chunk) -> None:
        assert response.speech is not None and chunk.totals is not None
        spoken = await response.speech.finished()
        if self._response is not response:
            return
        if not spoken:  # cancelled (barge-in, response.cancel) while it was being spoken
            chunk = replace(chunk, totals=replace(chunk.totals, status="cancelled"))
        self._finish(response, chunk)

    def _sink(self, response_id: str) -> ChunkSink:
        loop = self._loop
        assert loop is not None, "start() the session first"

        def deliver(chunk: Chunk) -> None:  # on the engine's worker thread
            try:
                loop.call_soon_threadsafe(self._on_chunk, response_id, chunk)
            except RuntimeError:  # the event loop is gone: nobody is listening
                if self._response is not None:
                    self._response.handle.cancel()

        return deliver

    def _on_chunk(self, response_id: str, chunk: Chunk) -> None:
        response = self._response
        if response is None or response.id != response_id:
            return
        if not chunk.is_final:
            if response.handle.cancelled or self.closed:
                return  # already on its way out: no more words
            response.text.append(chunk.text)
            if response.speech is not None:
                response.speech.add(chunk.text)
            self.transport.send(
                p.TextDelta(
                    response_id=response.id,
                    item_id=response.item_id,
                    delta=chunk.text,
                    chunk_index=chunk.chunk_index,
                    first_token_latency_ms=chunk.first_token_latency_ms,
                    processing_time_ms=chunk.processing_time_ms,
                )
            )
            if response.first_delta_at is None:
                response.first_delta_at = time.perf_counter()
                submitted = response.handle.submitted_at
                response.first_chunk_out_at = submitted + chunk.processing_time_ms / 1000
                if chunk.first_token_latency_ms is not None:
                    response.first_token_at = submitted + chunk.first_token_latency_ms / 1000
            return
        speech = response.speech
        if speech is not None and not speech.cancelled:
            assert chunk.totals is not None
            if chunk.totals.status == "completed" and not self.closed:
                # The text is complete; response.done waits until it has been spoken.
                speech.end()
                self._spawn(self._finish_when_spoken(response, chunk), f"speech-{response.id}")
                return
            speech.cancel()
        self._finish(response, chunk)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish(self, response: _Response, chunk: Chunk) -> None:
        totals = chunk.totals
        assert totals is not None
        speech = response.speech
        self._response = None
        self.turns += 1
        now = time.perf_counter()
        text = "".join(response.text)
        status: Literal["completed", "cancelled", "failed"] = (
            "failed" if totals.status == "error" else totals.status
        )
        details: dict[str, Any] | None = None
        if totals.status == "error":
            details = {
                "type": "failed",
                "error": {"code": totals.error_code, "message": totals.error},
            }
        elif totals.status == "cancelled":
            details = {"type": "cancelled", "reason": "client_cancelled"}
        timings = p.Timings(
            queue_wait_ms=totals.queue_wait_ms,
            model_ttft_ms=totals.model_ttft_ms,
            first_word_ms=(
                ms_between(response.turn_ended_at, response.first_delta_at)
                if response.first_delta_at is not None
                else None
            ),
            total_ms=ms_between(response.turn_ended_at, now),
            words=len(text.split()),
            tokens=totals.tokens,
            transport=self.transport.name,
            first_token_to_delta_ms=(
                ms_between(response.first_token_at, response.first_delta_at)
                if response.first_token_at is not None and response.first_delta_at is not None
                else None
            ),
            delivery_ms=(
                ms_between(response.first_chunk_out_at, response.first_delta_at)
                if response.first_chunk_out_at is not None and response.first_delta_at is not None
                else None
            ),
            cancel_latency_ms=totals.cancel_latency_ms,
            ttfa_ms=(
                ms_between(response.turn_ended_at, speech.first_audio_at)
                if speech is not None and speech.first_audio_at is not None
                else None
            ),
        )
        if totals.status == "completed" and self.mode == "chat":
            self.conversation.add(response.audio, text)
        record = TurnRecord(
            session=self.id,
            turn=self.turns,
            transport=self.transport.name,
            mode=self.mode,
            status=status,
            model_ttft_ms=timings.model_ttft_ms,
            first_word_ms=timings.first_word_ms,
            client_first_word_ms=None,
            queue_wait_ms=timings.queue_wait_ms,
            total_ms=timings.total_ms,
            words=timings.words,
            tokens=timings.tokens,
            tok_s=totals.tokens_per_s or None,
            cancel_latency_ms=timings.cancel_latency_ms,
            ttfa_ms=timings.ttfa_ms,
        )
        self._log_turn()  # a previous turn still waiting for its report goes out first
        if self.closed or self._loop is None:
            self._log_turn(record)
        else:
            wait_s = self.settings.logging.client_report_wait_ms / 1000
            timer = self._loop.call_later(wait_s, self._log_turn)
            self._unlogged = (response.id, record, timer)
        if self.closed:
            return
        self.transport.send(
            p.TextDone(response_id=response.id, item_id=response.item_id, text=text)
        )
        if speech is not None and speech.first_audio_at is not None:
            rid, iid = response.id, response.item_id
            self.transport.send(p.AudioDone(response_id=rid, item_id=iid))
            self.transport.send(
                p.TranscriptDone(response_id=rid, item_id=iid, transcript="".join(speech.spoken))
            )
        output = [
            {
                "id": response.item_id,
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text}],
            }
        ]
        self.transport.send(
            p.ResponseDone(
                response=p.Response(
                    id=response.id, status=status, status_details=details, output=output
                ),
                timings=timings,
            )
        )
        if totals.status == "error":
            self._error(totals.error_code or "generation_failed", totals.error or "failed")
        if self._answer_next:
            self._answer_next = False
            if self._committed is not None:
                self._create_response(None)

    def _client_timing(self, event: p.ClientTiming) -> None:
        if self._unlogged is None or self._unlogged[0] != event.response_id:
            return  # too late (already logged) or not a response of this session
        record = self._unlogged[1]
        seen = {
            "client_first_word_ms": event.first_word_ms,
            "client_first_audio_ms": event.first_audio_ms,
        }
        updates = {k: round(v, 3) for k, v in seen.items() if v is not None}
        self._log_turn(replace(record, **updates))  # type: ignore[arg-type]

    def _log_turn(self, record: TurnRecord | None = None) -> None:
        """Write the waiting turn's line (or `record`'s): exactly once per turn."""
        if record is None and self._unlogged is not None:
            record = self._unlogged[1]
        if self._unlogged is not None:
            self._unlogged[2].cancel()
            self._unlogged = None
        if record is not None and self.metrics is not None:
            self.metrics.turn(record)

    # ----------------------------------------------------------------- session.update

    async def _update(self, event: p.SessionUpdate) -> None:
        cfg = event.session
        if cfg.type is not None:
            self.mode = "chat" if cfg.type == "realtime" else "transcribe"
        if "instructions" in cfg.model_fields_set:
            self.instructions = cfg.instructions or None
        audio_in = cfg.audio.input if cfg.audio else None
        if audio_in is not None:
            if audio_in.transcription is not None and audio_in.transcription.language:
                self.language = audio_in.transcription.language
            if "turn_detection" in audio_in.model_fields_set:
                td = audio_in.turn_detection
                if td is None:
                    self.turn_detection = None
                    self._release_detector()
                else:
                    v = self.settings.vad
                    self.turn_detection = _TurnDetection(
                        td.threshold if td.threshold is not None else v.threshold,
                        td.prefix_padding_ms
                        if td.prefix_padding_ms is not None
                        else v.prefix_padding_ms,
                        td.silence_duration_ms
                        if td.silence_duration_ms is not None
                        else v.min_silence_ms,
                        td.create_response,
                        td.interrupt_response,
                    )
                    await self._ensure_detector(rebuild=True)
        self.transport.send(p.SessionUpdated(session=self._state()))

    async def _ensure_detector(self, rebuild: bool = False) -> None:
        td = self.turn_detection
        if td is None or (self._detector is not None and not rebuild):
            return
        pool = self._vad_models

        def build() -> vad.TurnDetector:
            model = pool.acquire() if pool is not None else None
            return vad.TurnDetector(td.threshold, td.silence_duration_ms, 0, model)

        # Without a warm model at hand, loading one takes ~50 ms of CPU: off the event loop.
        detector = await asyncio.to_thread(build)
        if self.closed:  # closed while the model loaded
            if pool is not None:
                pool.release(detector.model)
            return
        self._release_detector()
        # Its offsets count from here: audio received so far (or meanwhile) is not re-fed.
        detector.start_at(self._stream_samples)
        self._detector = detector

    def _release_detector(self) -> None:
        if self._detector is not None and self._vad_models is not None:
            self._vad_models.release(self._detector.model)
        self._detector = None

    def _state(self) -> p.SessionState:
        td = self.turn_detection
        turn_detection: dict[str, Any] | None = None
        if td is not None:
            turn_detection = {
                "type": "server_vad",
                "threshold": td.threshold,
                "prefix_padding_ms": td.prefix_padding_ms,
                "silence_duration_ms": td.silence_duration_ms,
                "create_response": td.create_response,
                "interrupt_response": td.interrupt_response,
            }
        return p.SessionState(
            id=self.id,
            type="realtime" if self.mode == "chat" else "transcription",
            model=self.settings.model.id,
            instructions=self.instructions,
            audio={
                "input": {
                    "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                    "turn_detection": turn_detection,
                    "transcription": {"language": self.language},
                }
            },
        )

    def _error(self, code: str, message: str, event_id: str | None = None) -> None:
        if self.metrics is not None:
            self.metrics.error(self.id, code, message)
        else:
            logger.warning("session=%s error code=%s: %s", self.id, code, message)
        if not self.closed:
            self.transport.send(p.error_event(code, message, event_id))
