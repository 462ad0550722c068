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
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ...config import Settings
from ...models import vad
from ...models.audio import SAMPLE_RATE, AudioInputError
from ...models.engine import Engine
from ...models.tts import TtsEngine
from ...models.turn.worker import JudgeWorker
from ...models.types import (
    Chunk,
    Conversation,
    EngineError,
    Request,
    RequestHandle,
    ms_between,
)
from .. import protocol as p
from ..metrics import Metrics, quoted
from ..speech import AudioOut, Speech
from . import report
from .endpointing import PauseWatch
from .input import (
    InputBuffer,
    InputEvent,
    InputPacer,
    Paused,
    Resumed,
    Silence,
    SpeechBegan,
    TurnEnded,
    ms_to_samples,
    parse_event,
)
from .response import Answer, settled, sink, speak, status_of
from .settings import SessionSettings
from .speculation import Speculation, SpeculationStats, engine_ms

logger = logging.getLogger(__name__)

Transport = p.Transport
_BIG_EVENT_BYTES = 64 * 1024  # parsed off the event loop above this (~1 s of 24 kHz PCM)


class Session:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        transport: Transport,
        metrics: Metrics | None = None,
        vad_worker: vad.VadWorker | None = None,
        tts: TtsEngine | None = None,
        judge: JudgeWorker | None = None,
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
        td = self.config.turn_detection
        if td is not None and td.semantic is not None and judge is None:
            # semantic_vad configured, its judge missing, vad.judge_fallback allowed this.
            self.config = replace(self.config, turn_detection=replace(td, type="server_vad"))
        self.conversation = Conversation(settings.conversation.max_turns)
        self.input = InputBuffer(settings.audio.max_utterance_s)
        a = settings.audio
        self._pacer = InputPacer(a.max_input_rate, a.max_utterance_s, time.monotonic)
        self._committed: TurnEnded | None = None  # a user turn awaiting its answer
        self._last_item: str | None = None
        self._answer: Answer | None = None
        self._answer_next = False  # a VAD turn waits for the current answer to end
        # Turn-taking: the judge (semantic_vad), the pause being judged, the answer run
        # speculatively during it, and the last turn while speech resuming may still revise it.
        self._judge = judge
        self._pause: Paused | None = None
        self._watch: PauseWatch | None = None
        self._spec: Speculation | None = None
        self._discarded: set[str] = set()  # speculative runs cancelled, final chunk to come
        self.spec_stats = SpeculationStats()
        self._revisable: _Revisable | None = None
        self._merge: _Revisable | None = None  # a revised turn the resumed speech extends
        self._retracted = 0  # answers taken back since the last logged turn
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
        self._end_pause()
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
                event, audio = await asyncio.to_thread(parse_event, raw, self.input.decoder)
            else:
                event, audio = parse_event(raw, self.input.decoder)
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
            elif isinstance(event, Paused):
                self._paused(event)
            elif isinstance(event, Resumed):
                self._end_pause()
            elif isinstance(event, Silence):
                self._silence(event)
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
        item_id = event.item_id
        revised = self._revisable
        self._revisable = None
        window = self.settings.vad.revision_window_ms
        if revised is not None and event.audio_start_ms - revised.turn.audio_end_ms <= window:
            self._revise(revised)
            item_id = revised.turn.item_id
        self.transport.send(p.SpeechStarted(audio_start_ms=event.audio_start_ms, item_id=item_id))
        if self._answer is not None and td.interrupt_response:
            logger.info("session=%s barge-in cancels response=%s", self.id, self._answer.id)
            self._answer.barged_in = True
            self._answer.stop()

    def _revise(self, revised: _Revisable) -> None:
        """The speaker went on within `vad.revision_window_ms` of a semantic_vad turn: it
        was not over. Its answer is taken back (cancelled if running, out of the history
        either way, `conversation.item.deleted`), and the speech that follows extends it."""
        turn = revised.turn
        logger.info("session=%s speech resumed: turn %s revised", self.id, turn.item_id)
        answer = self._answer
        if answer is not None and answer.item_id == turn.item_id:
            answer.retracted = True
            answer.stop()
        elif self._committed is not None and self._committed.item_id == turn.item_id:
            self._committed = None  # committed, its answer not started yet
            self._answer_next = False
        elif revised.in_history:
            self.conversation.drop_last()
        self._retracted += 1
        self._merge = revised
        self._last_item = revised.previous_item
        self.transport.send(p.ItemDeleted(item_id=turn.item_id))

    def _paused(self, pause: Paused) -> None:
        """Speech stopped: maybe the end of the turn. Start answering now, unseen."""
        td = self.config.turn_detection
        assert td is not None
        self._end_pause()
        self._pause = pause
        semantic = td.semantic
        if semantic is not None and self._judge is not None:
            self._watch = PauseWatch(semantic, pause.end)
        if td.create_response and self.settings.vad.speculative:
            self._speculate(pause)

    def _silence(self, silence: Silence) -> None:
        """The pause goes on: ask the judge whether the turn is over, when due."""
        watch, judge, pause = self._watch, self._judge, self._pause
        if watch is None or judge is None or pause is None or watch.speech_end != silence.end:
            return
        if not watch.due(silence.silence_ms):
            return
        watch.asked(silence.silence_ms)
        audio = self.input.peek(silence.end + ms_to_samples(silence.silence_ms))
        if self._merge is not None:
            audio = np.concatenate([self._merge.turn.audio, audio])
        loop = self._loop
        assert loop is not None
        ms = silence.silence_ms

        def verdict(probability: float | None, took_ms: float) -> None:  # judge thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(self._on_verdict, watch, ms, probability)

        judge.ask(self.id, audio, verdict)

    def _on_verdict(self, watch: PauseWatch, silence_ms: int, probability: float | None) -> None:
        if self.closed or watch is not self._watch or self._pause is None:
            return  # the pause is over (speech resumed, or the silence ended the turn)
        if not watch.answered(silence_ms, probability):
            return
        turn = self.input.end_turn(self._pause, silence_ms, "semantic")
        if turn is not None:
            self._turn_ended(turn)

    def _end_pause(self) -> None:
        """The pause is over and its speculative run with it (speech resumed, or the
        session closed)."""
        self._stop_judging()
        self._discard_speculation()

    def _stop_judging(self) -> None:
        self._pause = None
        if self._watch is not None:
            self._watch = None
            if self._judge is not None:
                self._judge.forget(self.id)

    def _speculate(self, pause: Paused) -> None:
        if self._answer is not None or self._committed is not None or self.closed:
            return  # an answer runs or waits: this pause's turn would wait behind it anyway
        audio = self.input.peek(pause.turn_end)
        if self._merge is not None:
            audio = np.concatenate([self._merge.turn.audio, audio])
        response_id = p.new_id("resp")
        try:
            handle = self._submit(audio, response_id, speculative=True)
        except (AudioInputError, EngineError):
            return  # too short to answer, or no room: the turn will be submitted as usual
        self._spec = Speculation(response_id, handle, pause.turn_end, self.turns)
        self.spec_stats.started += 1

    def _discard_speculation(self) -> None:
        spec = self._spec
        if spec is None:
            return
        self._spec = None
        spec.handle.cancel()
        self.spec_stats.discarded += 1
        final = spec.final
        if final is not None:
            self.spec_stats.wasted_ms += engine_ms(final)
        else:
            self._discarded.add(spec.id)  # its engine time is counted when it ends

    def _turn_ended(self, turn: TurnEnded) -> None:
        td = self.config.turn_detection
        assert td is not None
        self._stop_judging()  # the speculative run stays: the answer may be it
        merged = self._merge
        if merged is not None:  # the speech that revised a turn: one turn, one item
            self._merge = None
            audio = np.concatenate([merged.turn.audio, turn.audio])
            turn = replace(turn, item_id=merged.turn.item_id, audio=audio)
        since = turn.speech_end_at
        self.transport.send(
            p.SpeechStopped(
                audio_end_ms=turn.audio_end_ms,
                item_id=turn.item_id,
                since_speech_end_ms=None
                if since is None
                else ms_between(since, time.perf_counter()),
            )
        )
        previous = self._last_item
        self._committed_turn(turn)
        if (
            td.semantic is not None
            and turn.how in ("semantic", "silence")
            and self.settings.vad.revision_window_ms > 0
        ):
            self._revisable = _Revisable(turn, previous)
        if td.create_response:
            if self._answer is not None:
                # The previous answer is still ending (cancelled by this very speech, or
                # running on): this turn starts as soon as its response.done goes out.
                self._answer_next = True
            else:
                self._create_response(None)

    def _commit(self, event_id: str | None) -> None:
        self._revisable = None
        now = time.perf_counter()
        audio = self.input.commit(event_id)
        self._committed_turn(TurnEnded(p.new_id("item"), audio, 0, now))

    def _committed_turn(self, turn: TurnEnded) -> None:
        self.transport.send(p.Committed(item_id=turn.item_id, previous_item_id=self._last_item))
        self._last_item = turn.item_id
        self._committed = turn

    def _clear(self) -> None:
        self._revisable = self._merge = None
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
        response_id = p.new_id("resp")
        spec = self._kept_speculation(turn)
        if spec is not None:
            handle = spec.handle
            response_id = spec.id
            self.engine.promote(handle)
        else:
            try:
                handle = self._submit(turn.audio, response_id)
            except (AudioInputError, EngineError) as exc:
                # The turn stays committed: a client may retry response.create (engine_busy).
                self._error(exc.code, str(exc), event_id)
                return
        self._committed = None
        clock = report.TurnClock(
            turn.at, how=turn.how, silence_ms=turn.silence_ms, speech_end_at=turn.speech_end_at
        )
        clock.speculative = spec is not None
        self._answer = Answer(response_id, turn.item_id, handle, turn.audio, clock, self.transport)
        if self.mode == "chat" and self.tts is not None and self.audio_out is not None:
            self._answer.speech = self._speech(response_id, turn.item_id)
        self.transport.send(
            p.ResponseCreated(response=p.Response(id=response_id, status="in_progress"))
        )
        if spec is not None:  # the words it has so far go out now, the rest as they come
            self.spec_stats.kept += 1
            for chunk in spec.held:
                self._on_chunk(response_id, chunk)

    def _kept_speculation(self, turn: TurnEnded) -> Speculation | None:
        """The run started at this turn's pause, if it answers exactly this turn; any other
        is discarded."""
        spec, self._spec = self._spec, None
        if spec is None:
            return None
        if (
            turn.how in ("silence", "semantic")
            and spec.turn_end == turn.end
            and spec.turns == self.turns
            and spec.usable
        ):
            return spec
        self._spec = spec
        self._discard_speculation()
        return None

    def _submit(
        self, audio: np.ndarray, response_id: str, speculative: bool = False
    ) -> RequestHandle:
        chat = self.mode == "chat"
        request = Request(
            audio,
            "chat" if chat else "transcribe",
            language=self.config.language,
            instructions=self.config.instructions,
            history=self.conversation.history if chat else (),
            id=response_id,  # the engine's log lines name the response
            speculative=speculative,
        )
        loop = self._loop
        assert loop is not None, "start() the session first"

        def current() -> RequestHandle | None:
            answer, spec = self._answer, self._spec
            if answer is not None and answer.id == response_id:
                return answer.handle
            return spec.handle if spec is not None and spec.id == response_id else None

        return self.engine.submit(request, sink(loop, self._on_chunk, response_id, current))

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
        spec = self._spec
        if spec is not None and spec.id == response_id:
            spec.held.append(chunk)  # nobody sees it unless the turn ends at its pause
            return
        if response_id in self._discarded:
            if chunk.is_final:
                self._discarded.discard(response_id)
                self.spec_stats.wasted_ms += engine_ms(chunk)
            return
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
        if answer.retracted:
            totals = replace(totals, status="cancelled")
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
            revisable = self._revisable
            if revisable is not None and revisable.turn.item_id == answer.item_id:
                revisable.in_history = True
        spec_stats, retracted = self.spec_stats.reset(), self._retracted
        self._retracted = 0
        turn = report.record(
            self.id, self.turns, self.mode, status, timings, totals, spec_stats, retracted
        )
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
        config = self.config.updated(event.session, self.settings.vad)
        td = config.turn_detection
        if td is not None and td.semantic is not None and self._judge is None:
            raise p.ProtocolError(
                "semantic_vad_unavailable",
                "session.audio.input.turn_detection.type: semantic_vad needs the turn judge "
                "(Smart Turn), which this server has not loaded; use server_vad",
                event.event_id,
            )
        answer = self._answer
        if config.output_format != self.config.output_format and answer and answer.speech:
            raise p.ProtocolError(
                "output_audio_format_busy",
                f"session.audio.output.format cannot change while response {answer.id} is "
                "being spoken; send it after response.done",
                event.event_id,
            )
        self.config = config
        self.input.use_format(config.input_format)
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
            td.threshold,
            td.silence_ends_turn_ms,
            self.input.stream_samples,
            on_events,
            report_silence=td.semantic is not None and self._judge is not None,
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


@dataclass
class _Revisable:
    """A turn the judge ended, while speech resuming may still show it was not over."""

    turn: TurnEnded
    previous_item: str | None  # the item before it (a revised turn is committed again)
    in_history: bool = False  # its answer completed and went into the conversation


def _fields_set(event: p.SessionUpdate) -> set[str]:
    audio_in = event.session.audio.input if event.session.audio else None
    return set(audio_in.model_fields_set) if audio_in is not None else set()
