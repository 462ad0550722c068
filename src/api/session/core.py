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
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ...config import Settings
from ...models import vad
from ...models.audio import SAMPLE_RATE, AudioInputError
from ...models.chat import chat_messages
from ...models.engine import Engine
from ...models.tts import TtsEngine
from ...models.turn.worker import JudgeWorker
from ...models.types import (
    Chunk,
    EngineError,
    Message,
    Request,
    RequestHandle,
    Totals,
    ms_between,
)
from .. import protocol as p
from ..audio_formats import InputDecoder
from ..metrics import Metrics, quoted
from ..speech import AudioOut, Speech
from ..spoken import SpokenTimeline
from . import items as conv
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
from .settings import SessionSettings, max_tokens_of, tool_choice_of, tools_of
from .speculation import Speculation, SpeculationStats, engine_ms

logger = logging.getLogger(__name__)

Transport = p.Transport
MIN_ITEMS = 64  # items a conversation keeps at least (history reads the last turns only)
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
        turns = settings.conversation.max_turns
        self.conversation = conv.Conversation(turns, max(MIN_ITEMS, 8 * (turns + 1)))
        self._captions: dict[str, Answer] = {}  # input transcriptions running, by id
        self.input = InputBuffer(settings.audio.max_utterance_s)
        a = settings.audio
        self._pacer = InputPacer(a.max_input_rate, a.max_utterance_s, time.monotonic)
        self._committed: TurnEnded | None = None  # a user turn awaiting its answer
        self.conversation_id = p.new_id("conv")
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
        if self.tts is not None:  # spoken answers where the transport carries audio
            self.config = replace(self.config, output_modality="audio")
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
        for caption in self._captions.values():
            caption.stop()
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
    def can_speak(self) -> bool:
        """Answers can be spoken: a TTS engine, and a transport that carries audio."""
        return self.tts is not None and self.audio_out is not None

    @property
    def responding(self) -> bool:
        """A response, or a transcription session's transcription, is running."""
        return self._answer is not None

    @property
    def transcribing(self) -> bool:
        return self._answer is not None and self._answer.transcribes is not None

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
            self._create_response(event.event_id, event.response or p.ResponseParams())
        elif isinstance(event, p.ResponseCancel):
            self._cancel(event.event_id, event.response_id)
        elif isinstance(event, p.ConversationItemCreate):
            self._create_item(event)
        elif isinstance(event, p.ConversationItemRetrieve):
            item = self.conversation.get(event.item_id)
            if item is None:  # OpenAI's code (pipecat, for one, expects it)
                raise p.ProtocolError(
                    "item_retrieve_invalid_item_id",
                    f"no item {event.item_id!r} in the conversation",
                    event.event_id,
                )
            self.transport.send(p.ItemRetrieved(item=item.wire()))
        elif isinstance(event, p.ConversationItemDelete):
            self._delete_item(event)
        elif isinstance(event, p.ConversationItemTruncate):
            self._truncate(event)
        elif isinstance(event, p.OutputAudioBufferClear):
            self._clear_output_audio()
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
        answer = self._answer
        if answer is not None and td.interrupt_response and self.mode == "chat":
            logger.info("session=%s barge-in cancels response=%s", self.id, answer.id)
            answer.barged_in = True
            if answer.speech is not None and answer.heard_ms is None:
                answer.heard_ms = answer.speech.heard_ms()  # its item keeps the words heard
            answer.stop()

    def _revise(self, revised: _Revisable) -> None:
        """The speaker went on within `vad.revision_window_ms` of a semantic_vad turn: it
        was not over. Its answer is taken back (cancelled if running, out of the history
        either way, `conversation.item.deleted`), and the speech that follows extends it."""
        turn = revised.turn
        logger.info("session=%s speech resumed: turn %s revised", self.id, turn.item_id)
        answer = self._answer
        if answer is not None and answer.user_item == turn.item_id:
            answer.retracted = True  # its items leave the conversation when it ends
            answer.stop()
        elif self._committed is not None and self._committed.item_id == turn.item_id:
            self._committed = None  # committed, its answer not started yet
            self._answer_next = False
        for item_id in revised.answer_items:  # its answer, completed
            self._remove_item(item_id)
        self._retracted += 1
        self._merge = revised
        # The user item goes too: it comes back, with the rest of the speech, at the commit.
        self._remove_item(turn.item_id)

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
        history = self.conversation.history()
        try:
            request = self._request(audio, history, p.ResponseParams(), response_id, True)
            handle = self._submit(request)
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
        self._committed_turn(turn)
        if (
            td.semantic is not None
            and turn.how in ("semantic", "silence")
            and self.settings.vad.revision_window_ms > 0
        ):
            self._revisable = _Revisable(turn)
        if td.create_response or self.mode == "transcribe":
            self._answer_turn()

    def _answer_turn(self) -> None:
        """Answer (or, in a transcription session, write down) the committed turn: now, or as
        soon as the previous answer's response.done goes out (cancelled by this very speech,
        or running on)."""
        if self._answer is not None:
            self._answer_next = True
        elif self.mode == "transcribe":
            self._transcribe()
        else:
            self._create_response(None, p.ResponseParams(), automatic=True)

    def _commit(self, event_id: str | None) -> None:
        self._revisable = None
        now = time.perf_counter()
        audio = self.input.commit(event_id)
        self._committed_turn(TurnEnded(p.new_id("item"), audio, 0, now))
        if self.mode == "transcribe":  # a commit alone writes the turn down
            self._answer_turn()

    def _committed_turn(self, turn: TurnEnded) -> None:
        """The user's turn is over: its audio becomes a user item of the conversation."""
        previous = self.conversation.last_id
        self.transport.send(p.Committed(item_id=turn.item_id, previous_item_id=previous))
        item = conv.Item(turn.item_id, "message", "user", audio=turn.audio)
        self._add_item(item)
        self._committed = turn
        if self.mode == "chat" and self.config.transcription_model is not None:
            self._caption(item)

    def _add_item(self, item: conv.Item, previous_item_id: str | None = None) -> None:
        previous = self.conversation.add(item, previous_item_id)
        self.transport.send(p.ItemAdded(previous_item_id=previous, item=item.wire()))
        self.transport.send(p.ItemDone(previous_item_id=previous, item=item.wire()))

    def _remove_item(self, item_id: str) -> None:
        if self.conversation.delete(item_id) is not None:
            self.transport.send(p.ItemDeleted(item_id=item_id))

    def _previous_of(self, item: conv.Item) -> str | None:
        return self.conversation.previous_id(item) if item in self.conversation.items else None

    # ----------------------------------------------------------------- conversation events

    def _create_item(self, event: p.ConversationItemCreate) -> None:
        if event.item.type == "item_reference":
            raise p.ProtocolError(
                "invalid_item",
                "item_reference items only go in response.create's input",
                event.event_id,
            )
        item = conv.from_client(event.item, self._decode_audio, p.new_id("item"), event.event_id)
        try:
            self._add_item(item, event.previous_item_id)
        except p.ProtocolError as exc:
            raise p.ProtocolError(exc.code, str(exc), event.event_id) from None

    def _delete_item(self, event: p.ConversationItemDelete) -> None:
        item = self.conversation.find(event.item_id, event.event_id)
        self._remove_item(item.id)

    def _truncate(self, event: p.ConversationItemTruncate) -> None:
        """Cut an assistant item's text to the words heard in its first `audio_end_ms`."""
        item = self.conversation.find(event.item_id, event.event_id)
        if item.role != "assistant" or item.type != "message":
            raise p.ProtocolError(
                "invalid_item", "only assistant message items can be truncated", event.event_id
            )
        if event.content_index != 0:
            raise p.ProtocolError(
                "invalid_content_index",
                f"item {item.id} has one content part (index 0), not {event.content_index}",
                event.event_id,
            )
        answer = self._answer
        running = answer is not None and answer.item is item
        timeline = self._timeline(answer) if running and answer else item.timeline
        duration = timeline.duration_ms if timeline is not None else 0
        if event.audio_end_ms > math.ceil(duration):
            raise p.ProtocolError(
                "invalid_audio_end_ms",
                f"audio_end_ms {event.audio_end_ms} is beyond the {duration:.0f} ms of audio "
                f"of item {item.id}",
                event.event_id,
            )
        if running and answer is not None:
            answer.heard_ms = event.audio_end_ms  # cut when it ends
            answer.stop()
        elif timeline is not None:
            item.text = timeline.text_until(event.audio_end_ms)
        else:
            item.text = ""
        self.transport.send(
            p.ItemTruncated(item_id=item.id, audio_end_ms=event.audio_end_ms, content_index=0)
        )

    def _decode_audio(self, b64: str) -> np.ndarray:
        """Audio of a client's item, in the session's input format, as 16 kHz float32."""
        decoder = InputDecoder(self.config.input_format)
        try:
            audio = decoder.decode(b64)
        except ValueError as exc:
            raise p.ProtocolError("invalid_audio", f"item audio: {exc}") from None
        return np.concatenate([audio, decoder.flush()])

    def _clear_output_audio(self) -> None:
        """`output_audio_buffer.clear`: stop the speech (the answer ends cancelled)."""
        answer = self._answer
        if answer is not None and answer.speech is not None:
            answer.stop()
        elif self.audio_out is not None:
            self.audio_out.clear()

    def _clear(self) -> None:
        self._revisable = self._merge = None
        self._answer_next = False
        self._committed = None
        self.input.clear()
        self.transport.send(p.Cleared())

    # ----------------------------------------------------------------- answers

    def _create_response(
        self, event_id: str | None, params: p.ResponseParams, automatic: bool = False
    ) -> None:
        """An answer over the conversation (or `params.input`): response.created now, its
        items and words as they come. `automatic`: turn detection asked for it."""
        if self.mode == "transcribe":
            raise p.ProtocolError(
                "not_in_transcription_session",
                "a transcription session writes each committed turn down by itself "
                "(conversation.item.input_audio_transcription.*); response.create is for "
                "realtime sessions",
                event_id,
            )
        if self._answer is not None:
            raise p.ProtocolError(
                "conversation_already_has_active_response",
                f"response {self._answer.id} is still running; cancel it first",
                event_id,
            )
        in_conversation = params.conversation == "auto"
        turn = self._committed if params.input is None else None
        history = self._context(params, event_id)
        try:
            chat_messages(Request(None, history=history, instructions=params.instructions))
        except EngineError:
            raise p.ProtocolError(
                "nothing_to_answer",
                "nothing to answer: commit the input audio buffer, or add a user item "
                "(conversation.item.create), first",
                event_id,
            ) from None
        spec = self._kept_speculation(turn) if automatic and turn is not None else None
        if spec is None:
            self._discard_speculation()
        response_id = spec.id if spec is not None else p.new_id("resp")
        if spec is not None:
            handle = spec.handle
            self.engine.promote(handle)
        else:
            try:
                request = self._request(None, history, params, response_id)
                handle = self._submit(request)
            except (AudioInputError, EngineError) as exc:
                # The turn stays committed: a client may retry response.create (engine_busy).
                self._error(exc.code, str(exc), event_id)
                return
        if in_conversation:
            self._committed = None
        # The answer's clock starts when it was asked for: at the end of the turn, or at the
        # response.create (a push-to-talk client may wait before sending it).
        asked_at = turn.at if automatic and turn is not None else time.perf_counter()
        clock = report.TurnClock(
            asked_at,
            how=turn.how if turn is not None else "commit",
            silence_ms=turn.silence_ms if turn is not None else None,
            speech_end_at=turn.speech_end_at if turn is not None and automatic else None,
        )
        clock.speculative = spec is not None
        modality = (params.output_modalities or [self.config.output_modality])[0]
        spoken = modality == "audio" and self.can_speak and self.mode == "chat"
        answer = Answer(
            response_id,
            handle,
            clock,
            self.transport,
            user_item=turn.item_id if turn is not None else None,
            spoken=spoken,
            add_item=self.conversation.add if in_conversation else None,
        )
        answer.response = p.Response(
            id=response_id,
            status="in_progress",
            conversation_id=self.conversation_id if in_conversation else None,
            output_modalities=["audio" if spoken else "text"],
            max_output_tokens=request_max_tokens(params, self.config.max_output_tokens) or "inf",
            metadata=params.metadata,
        )
        self._answer = answer
        if spoken:
            answer.speech = self._speech(response_id, answer.message_id)
        self.transport.send(p.ResponseCreated(response=answer.response))
        if spec is not None:  # the words it has so far go out now, the rest as they come
            self.spec_stats.kept += 1
            for chunk in spec.held:
                self._on_chunk(response_id, chunk)

    def _context(self, params: p.ResponseParams, event_id: str | None) -> tuple[Message, ...]:
        """What the answer reads: the conversation, or the response's own `input`."""
        if params.input is None:
            return self.conversation.history()
        chosen: list[conv.Item] = []
        for i, param in enumerate(params.input):
            if param.type == "item_reference":
                if not param.id:
                    raise p.ProtocolError(
                        "invalid_item", f"input[{i}]: an item_reference needs an id", event_id
                    )
                chosen.append(self.conversation.find(param.id, event_id))
            else:
                chosen.append(
                    conv.from_client(param, self._decode_audio, p.new_id("item"), event_id)
                )
        return conv.messages(chosen)

    def _request(
        self,
        audio: np.ndarray | None,
        history: tuple[Message, ...],
        params: p.ResponseParams,
        response_id: str,
        speculative: bool = False,
    ) -> Request:
        """The engine request of an answer (or a transcription, in a transcription session)."""
        config = self.config
        if self.mode == "transcribe":
            return Request(
                audio, "transcribe", language=config.language, id=response_id,
                speculative=speculative,
            )  # fmt: skip
        tools = config.tools if params.tools is None else tools_of(params.tools)
        choice = config.tool_choice if params.tool_choice is None else tool_choice_of(
            params.tool_choice
        )  # fmt: skip
        if choice not in ("auto", "none", "required") and choice not in {t.name for t in tools}:
            raise EngineError("invalid_tool_choice", f"tool_choice names no tool: {choice!r}")
        instructions = config.instructions if params.instructions is None else params.instructions
        return Request(
            audio,
            "chat",
            instructions=instructions or None,
            history=history,
            tools=tools,
            tool_choice=choice,
            max_new_tokens=request_max_tokens(params, config.max_output_tokens),
            id=response_id,  # the engine's log lines name the response
            speculative=speculative,
        )

    def _transcribe(self) -> None:
        """Transcription session: write the committed turn down (its user item's captions)."""
        turn = self._committed
        if turn is None:
            return
        self._committed = None
        item = self.conversation.get(turn.item_id)
        spec = self._kept_speculation(turn)
        if spec is not None:
            handle, response_id = spec.handle, spec.id
            self.engine.promote(handle)
        else:
            response_id = p.new_id("resp")
            try:
                handle = self._submit(
                    self._request(turn.audio, (), p.ResponseParams(), response_id)
                )
            except (AudioInputError, EngineError) as exc:
                self._transcription_failed(turn.item_id, exc.code, str(exc))
                return
        clock = report.TurnClock(
            turn.at, how=turn.how, silence_ms=turn.silence_ms, speech_end_at=turn.speech_end_at
        )
        clock.speculative = spec is not None
        if item is None:  # deleted meanwhile: written down for the log only
            item = conv.Item(turn.item_id, "message", "user", audio=turn.audio)
        self._answer = Answer(
            response_id, handle, clock, self.transport, user_item=turn.item_id, transcribes=item,
        )  # fmt: skip
        if spec is not None:
            self.spec_stats.kept += 1
            for chunk in spec.held:
                self._on_chunk(response_id, chunk)

    def _transcription_failed(self, item_id: str, code: str, message: str) -> None:
        error = p.ErrorDetail(type="server_error", code=code, message=message)
        self.transport.send(p.InputTranscriptionFailed(item_id=item_id, error=error))

    def _caption(self, item: conv.Item, sent: str = "") -> None:
        """A realtime session's input transcription: the user item written down by the same
        engine, at the lowest priority (a speculative request: it never holds up an answer;
        stopped for one, it starts again and skips the words already sent)."""
        if item.audio is None or self.closed:
            return
        caption_id = p.new_id("tr")
        request = Request(
            item.audio, "transcribe", language=self.config.language, id=caption_id,
            speculative=True,
        )  # fmt: skip
        try:
            handle = self._submit(request)
        except (AudioInputError, EngineError) as exc:
            self._transcription_failed(item.id, exc.code, str(exc))
            return
        clock = report.TurnClock(time.perf_counter())
        caption = Answer(caption_id, handle, clock, self.transport, transcribes=item)
        caption.already_sent = sent
        self._captions[caption_id] = caption

    def _on_caption(self, caption: Answer, chunk: Chunk) -> None:
        if not chunk.is_final:
            caption.deliver(chunk)
            return
        del self._captions[caption.id]
        totals = chunk.totals
        assert totals is not None and caption.transcribes is not None
        item = caption.transcribes
        if totals.status == "completed":
            caption.send_done("completed", totals, None, self._previous_of)
        elif totals.status == "error":
            self._transcription_failed(item.id, totals.error_code or "failed", totals.error or "")
        elif caption.handle.preempted and not self.closed:
            self._caption(item, caption.already_sent + caption.answer_text)  # again, later

    def _kept_speculation(self, turn: TurnEnded | None) -> Speculation | None:
        """The run started at this turn's pause, if it answers exactly this turn; any other
        is discarded."""
        spec, self._spec = self._spec, None
        if spec is None:
            return None
        if (
            turn is not None
            and turn.how in ("silence", "semantic")
            and spec.turn_end == turn.end
            and spec.turns == self.turns
            and spec.usable
        ):
            return spec
        self._spec = spec
        self._discard_speculation()
        return None

    def _submit(self, request: Request) -> RequestHandle:
        loop = self._loop
        assert loop is not None, "start() the session first"
        response_id = request.id

        def current() -> RequestHandle | None:
            answer, spec = self._answer, self._spec
            if answer is not None and answer.id == response_id:
                return answer.handle
            caption = self._captions.get(response_id)
            if caption is not None:
                return caption.handle
            return spec.handle if spec is not None and spec.id == response_id else None

        return self.engine.submit(request, sink(loop, self._on_chunk, response_id, current))

    def _cancel(self, event_id: str | None, response_id: str | None) -> None:
        if self._answer is None or self._answer.transcribes is not None:
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
            self.transport if self.config.spoken_events else None,
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
        caption = self._captions.get(response_id)
        if caption is not None:
            if not self.closed:
                self._on_caption(caption, chunk)
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
        revisable = self._revisable
        if revisable is not None and revisable.turn.item_id == answer.user_item:
            revisable.answer_items = [item.id for item in answer.output]
        spec_stats, retracted = self.spec_stats.reset(), self._retracted
        self._retracted = 0
        turn = report.record(
            self.id, self.turns, self.mode, status, timings, totals, spec_stats, retracted
        )
        # A transcription is logged under its item (the id its client knows it by).
        logged_as = answer.transcribes.id if answer.transcribes is not None else answer.id
        self._log.add(logged_as, turn, None if self.closed else self._loop)
        if self.closed:
            return
        heard_ms = self._heard(answer, totals)
        timeline = self._timeline(answer)
        heard = timeline.text_until(heard_ms) if heard_ms is not None and timeline else None
        answer.send_done(status, totals, timings, self._previous_of, heard)
        if heard_ms is not None and answer.item is not None and answer.add_item is not None:
            # Cut to what was heard, as if the client had truncated it.
            truncated = p.ItemTruncated(item_id=answer.item.id, audio_end_ms=int(heard_ms))
            self.transport.send(truncated)
        if answer.retracted:  # the turn was not over: its answer leaves the conversation
            for item in answer.output:
                self._remove_item(item.id)
        if totals.status == "error":
            self._error(totals.error_code or "generation_failed", totals.error or "failed")
        if self._answer_next:
            self._answer_next = False
            if self._committed is not None:
                self._answer_turn()

    def _heard(self, answer: Answer, totals: Totals) -> float | None:
        """How much of a spoken answer cut short the user heard (ms; None: all of it, or a
        text answer). The speech's timeline stays on the item, for a later truncate."""
        speech = answer.speech
        if speech is None:
            return None
        answer.item_timeline(speech.timeline)
        if totals.status == "completed" and answer.heard_ms is None:
            return None
        return answer.heard_ms if answer.heard_ms is not None else speech.heard_ms()

    def _timeline(self, answer: Answer) -> SpokenTimeline | None:
        return answer.speech.timeline if answer.speech is not None else None

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
    answer_items: list[str] = field(default_factory=list)  # its answer's items, once done


def request_max_tokens(params: p.ResponseParams, session: int | None) -> int | None:
    """An answer's token limit: its own, else the session's (None: model.max_new_tokens)."""
    if "max_output_tokens" in params.model_fields_set:
        return max_tokens_of(params.max_output_tokens)
    return session


def _fields_set(event: p.SessionUpdate) -> set[str]:
    audio_in = event.session.audio.input if event.session.audio else None
    return set(audio_in.model_fields_set) if audio_in is not None else set()
