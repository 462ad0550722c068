"""Speech out for one answer: words -> phrases -> TTS on a worker thread -> the transport's audio.

The session feeds `Speech` the answer's word chunks as they arrive. Phrases (see
`models/phrases.py`) are synthesised one after the other, in order, while generation goes on;
each chunk of PCM goes to the transport's `AudioOut` as soon as the engine yields it (the
WebSocket sends it as `response.output_audio.delta`, WebRTC queues it on the call's audio
track). When a phrase's first audio leaves, `on_phrase` gets its text (the page marks those
words as spoken). `cancel()` (barge-in, response.cancel) drops all queued audio at once and
stops synthesis at the engine's next chunk.

`Speech.timeline` (a `SpokenTimeline`) records which words each stretch of the answer's audio
carries and how much of it has been sent; `heard_ms()` says how far the listener got.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..config import TtsSettings
from ..models.audio import PcmResampler
from ..models.phrases import PhraseChunker
from ..models.tts import TtsEngine, TtsError
from . import protocol as p
from .audio_formats import AudioFormat, encode_audio
from .spoken import SpokenTimeline

logger = logging.getLogger(__name__)

OnStart = Callable[[], None]


class AudioOut(Protocol):
    """Where a conversation's speech goes; owned by its transport."""

    @property
    def rate(self) -> int:
        """The sample rate `write` takes (Hz), read when an answer's speech starts."""

    def write(
        self,
        pcm: np.ndarray,
        ids: tuple[str, str],
        on_start: OnStart | None,
        timeline: SpokenTimeline | None = None,
    ) -> None:
        """Queue int16 mono PCM of response/item `ids`; `on_start` runs when its first
        sample is sent, `timeline.sent()` counts its samples as they are sent. Never blocks."""

    def finish(self, response_id: str) -> None:
        """No more audio of `response_id` will be written: once what is queued of it has
        been played, the WebRTC track sends `output_audio_buffer.stopped`."""

    def clear(self) -> bool:
        """Drop every sample not yet sent; True if there were any. The WebRTC track sends
        `output_audio_buffer.cleared` for the response whose audio this cut short."""

    def unplayed_ms(self) -> float:
        """Audio sent that the client has not played yet (ms), as far as the server knows."""

    async def drained(self) -> None:
        """Until every sample written so far has been sent."""


@dataclass(slots=True)
class _Segment:
    pcm: np.ndarray
    ids: tuple[str, str]
    on_start: OnStart | None
    timeline: SpokenTimeline | None


class SampleQueue:
    """Speech waiting to be sent: PCM segments taken out in pieces of any size.

    `on_start` of a segment runs when its first sample is taken, its timeline counts the
    samples taken; `drained` is set whenever nothing waits. Used by both transports' audio
    outs, on the event loop.
    """

    def __init__(self) -> None:
        self._segments: deque[_Segment] = deque()
        self._offset = 0  # samples of _segments[0] already taken
        self.drained = asyncio.Event()
        self.drained.set()
        self.ready = asyncio.Event()  # something waits

    def write(
        self,
        pcm: np.ndarray,
        ids: tuple[str, str],
        on_start: OnStart | None,
        timeline: SpokenTimeline | None = None,
    ) -> None:
        if pcm.size:
            pcm = pcm.astype(np.int16, copy=False)
            self._segments.append(_Segment(pcm, ids, on_start, timeline))
            self.drained.clear()
            self.ready.set()

    @property
    def next_ids(self) -> tuple[str, str] | None:
        """The ids of the next sample to be taken, None if nothing waits."""
        return self._segments[0].ids if self._segments else None

    def clear(self) -> tuple[str, str] | None:
        """Drop everything waiting; the ids of the first sample dropped, None if none was."""
        dropped = self.next_ids
        self._segments.clear()
        self._offset = 0
        self._idle()
        return dropped

    def take(self, count: int) -> tuple[np.ndarray, tuple[str, str] | None]:
        """Up to `count` samples (fewer if fewer wait) and the ids of the first of them."""
        pieces: list[np.ndarray] = []
        ids: tuple[str, str] | None = None
        wanted = count
        while wanted and self._segments:
            segment = self._segments[0]
            if ids is None:
                ids = segment.ids
            elif segment.ids != ids:
                break  # one piece never mixes two responses
            if self._offset == 0 and segment.on_start is not None:
                segment.on_start()  # this segment's first sample goes out now
            n = min(wanted, segment.pcm.size - self._offset)
            pieces.append(segment.pcm[self._offset : self._offset + n])
            if segment.timeline is not None:
                segment.timeline.sent(n)
            wanted -= n
            self._offset += n
            if self._offset == segment.pcm.size:
                self._segments.popleft()
                self._offset = 0
        if not self._segments:
            self._idle()
        return (np.concatenate(pieces) if pieces else np.zeros(0, np.int16)), ids

    def _idle(self) -> None:
        self.ready.clear()
        self.drained.set()


class WebSocketAudioOut:
    """`response.output_audio.delta` events in the session's output format, paced to
    playback with a short lead.

    Sent no more than `lead_s` ahead of real time, so the page never holds more than that
    and a barge-in stops the audio here, not only in the page: `clear()` drops the rest.
    `output_format` is read when an answer's speech starts (its rate) and for every piece
    sent (its encoding): the session refuses to change it while an answer is spoken.
    The client is assumed to play each delta as it arrives, so what it has not played yet is
    what was sent ahead of real time (`unplayed_ms`). No `output_audio_buffer.*` events: as
    with OpenAI's API, they are WebRTC-only (a WebSocket client holds its own buffer).
    """

    PIECE_S = 0.04

    def __init__(
        self,
        send: Callable[[p.ServerEvent], None],
        output_format: Callable[[], AudioFormat],
        lead_s: float = 0.25,
    ) -> None:
        self._send = send
        self.output_format = output_format
        self.lead_s = lead_s
        self._queue = SampleQueue()
        self._task: asyncio.Task[None] | None = None
        self._played_until = 0.0  # loop time when the client will have played all sent

    @property
    def rate(self) -> int:
        return self.output_format().rate

    def write(
        self,
        pcm: np.ndarray,
        ids: tuple[str, str],
        on_start: OnStart | None,
        timeline: SpokenTimeline | None = None,
    ) -> None:
        self._queue.write(pcm, ids, on_start, timeline)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._pump(), name="audio-out")

    def finish(self, response_id: str) -> None:
        pass  # nothing to announce on a WebSocket

    def clear(self) -> bool:
        return self._queue.clear() is not None

    def unplayed_ms(self) -> float:
        ahead = self._played_until - asyncio.get_running_loop().time()
        return max(ahead, 0.0) * 1000

    async def drained(self) -> None:
        await self._queue.drained.wait()

    async def close(self) -> None:
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._queue.ready.wait()
            now = loop.time()
            # After a pause the page's buffer is empty.
            self._played_until = max(self._played_until, now)
            if self._played_until - now > self.lead_s:
                await asyncio.sleep(self._played_until - now - self.lead_s)  # real-time pacing
                continue
            fmt = self.output_format()
            pcm, ids = self._queue.take(int(fmt.rate * self.PIECE_S))
            if ids is None:
                continue
            data = base64.b64encode(encode_audio(pcm, fmt)).decode("ascii")
            self._send(p.AudioDelta(response_id=ids[0], item_id=ids[1], delta=data))
            self._played_until += pcm.size / fmt.rate


class Speech:
    def __init__(
        self,
        tts: TtsEngine,
        out: AudioOut,
        settings: TtsSettings,
        ids: tuple[str, str],
        on_phrase: Callable[[str], None],
        on_error: Callable[[str, str], None],
    ) -> None:
        self.tts = tts
        self.out = out
        self.ids = ids
        self.on_phrase = on_phrase
        self.on_error = on_error
        self.chunker = PhraseChunker(
            settings.first_phrase_min_words,
            settings.phrase_min_words,
            settings.phrase_timeout_ms / 1000,
        )
        self.first_audio_at: float | None = None  # perf_counter of the first sample sent
        self.spoken: list[str] = []  # phrases whose audio has started, in order
        # Which words the answer's audio carries where; outlives this object (the
        # conversation keeps it with the assistant item, for conversation.item.truncate).
        self.timeline = SpokenTimeline(out.rate)
        self.cancelled = False
        self._loop = asyncio.get_running_loop()
        self._phrases: asyncio.Queue[str | None] = asyncio.Queue()
        self._timer: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[bool] = self._loop.create_future()
        self._task = self._loop.create_task(self._speak(), name=f"speech-{ids[0]}")

    # ----------------------------------------------------------------- from the session

    def add(self, text: str) -> None:
        """A word chunk of the answer."""
        if not self.cancelled:
            self._queue(self.chunker.feed(text, time.perf_counter()))

    def end(self) -> None:
        """The answer's text is complete: speak what is left."""
        if not self.cancelled:
            self._queue(self.chunker.flush())
            self._phrases.put_nowait(None)

    def cancel(self) -> None:
        """Stop now: queued audio is dropped, synthesis stops at its next chunk."""
        if self.cancelled:
            return
        self.cancelled = True
        if self._timer is not None:
            self._timer.cancel()
        self.out.clear()
        self._phrases.put_nowait(None)
        if not self._done.done():
            self._done.set_result(False)

    async def finished(self) -> bool:
        """True once everything was spoken (sent), False if cancelled first."""
        return await asyncio.shield(self._done)

    def heard_ms(self) -> int:
        """How far into this answer's audio the listener is now (ms): what the transport
        sent, less what the client holds but has not played yet. At a barge-in, call it
        then (before or after `cancel()`, which does not change it): `timeline.text_until()`
        of it is what the user heard."""
        return self.timeline.heard_ms(self.out.unplayed_ms())

    @property
    def task(self) -> asyncio.Task[None]:
        """Synthesis: ends by itself once the answer is spoken or `cancel()` was called."""
        return self._task

    # ----------------------------------------------------------------- phrases

    def _queue(self, phrases: list[str]) -> None:
        for phrase in phrases:
            self._phrases.put_nowait(phrase)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self.chunker.due_at()
        if due is not None:
            delay = max(due - time.perf_counter(), 0.0)
            self._timer = self._loop.call_later(delay, self._timeout)

    def _timeout(self) -> None:
        self._timer = None
        if not self.cancelled:
            self._queue(self.chunker.poll(time.perf_counter()))

    async def _speak(self) -> None:
        resampler = PcmResampler(self.tts.sample_rate, self.out.rate)
        try:
            while True:
                phrase = await self._phrases.get()
                if phrase is None or self.cancelled:
                    break
                self.timeline.begin(phrase)
                if phrase.strip():
                    await self._synthesise(phrase, resampler)
                if not self.cancelled:
                    self.timeline.close()
            if not self.cancelled:
                tail = resampler.flush()  # the last phrase's last samples
                self._write(tail, None)
                self.out.finish(self.ids[0])
                await self.out.drained()
        except Exception as exc:  # any failure must still end the answer, never hang it
            if isinstance(exc, TtsError):
                logger.error("speech %s failed: %s", self.ids[0], exc)
                code, message = exc.code, str(exc)
            else:
                logger.exception("speech %s failed", self.ids[0])
                code, message = "tts_failed", f"{type(exc).__name__}: {exc}"
            if not self.cancelled:
                self.out.clear()  # nothing half-spoken stays queued after a failure
            self.on_error(code, message)
        finally:
            if not self._done.done():
                self._done.set_result(not self.cancelled)

    async def _synthesise(self, phrase: str, resampler: PcmResampler) -> None:
        chunks: Iterator[np.ndarray] = self.tts.stream(phrase.strip())
        on_start: OnStart | None = self._starter(phrase)
        try:
            while not self.cancelled:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None or self.cancelled:
                    break
                pcm = resampler.feed(chunk)
                if pcm.size:
                    self._write(pcm, on_start)
                    on_start = None
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                await asyncio.to_thread(close)  # may stop a subprocess: not on the loop

    def _write(self, pcm: np.ndarray, on_start: OnStart | None) -> None:
        if pcm.size:
            self.timeline.extend(pcm)
            self.out.write(pcm, self.ids, on_start, self.timeline)

    def _starter(self, phrase: str) -> OnStart:
        def started() -> None:
            if self.cancelled:
                return
            if self.first_audio_at is None:
                self.first_audio_at = time.perf_counter()
            self.spoken.append(phrase)
            self.on_phrase(phrase)

        return started
