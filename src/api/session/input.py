"""The input audio buffer and server-VAD turns: audio in -> speech started / turn ended.

Bookkeeping over sample offsets in the session's stream (no events sent from here). Audio is
kept as a list of the chunks received (joined once, when a turn ends), and goes on to the
shared VAD worker (`models.vad`), which judges it off the event loop; its verdicts come back
through `on_vad`. `append` and `on_vad` return what happened, and the session turns that
into events, a response or a barge-in.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...models import vad
from ...models.audio import SAMPLE_RATE, AudioChunks
from .. import protocol as p
from ..audio_formats import DEFAULT_FORMAT, AudioFormat, InputDecoder

TAIL_KEEP_S = 0.1  # audio kept after the detected end of speech
MIN_COMMIT_S = 0.1  # OpenAI's minimum for a committed buffer
_IDLE_KEEP_S = 1.0  # kept before speech, beyond the prefix padding, while nobody speaks


def samples_to_ms(samples: int) -> int:
    return samples * 1000 // SAMPLE_RATE


def ms_to_samples(ms: float) -> int:
    return int(ms * SAMPLE_RATE / 1000)


@dataclass(frozen=True)
class SpeechBegan:
    item_id: str
    audio_start_ms: int


@dataclass(frozen=True)
class Paused:
    """Speech stopped at stream offset `end` (the turn may be over): the audio a turn
    ending here would commit ends at `turn_end`."""

    item_id: str
    end: int
    turn_end: int


@dataclass(frozen=True)
class Resumed:
    """Speech again before the pause ended the turn."""

    item_id: str


@dataclass(frozen=True)
class Silence:
    """The pause after the speech that ended at `end` has lasted `silence_ms`."""

    end: int
    silence_ms: int


@dataclass(frozen=True)
class TurnEnded:
    """A spoken turn is over (the speaker paused, or reached audio.max_utterance_s)."""

    item_id: str
    audio: np.ndarray
    audio_end_ms: int
    at: float  # perf_counter when the end was detected
    how: str = "commit"  # silence | semantic | limit | commit
    end: int = 0  # stream offset where the committed audio ends
    silence_ms: float | None = None  # silence heard after the speech when the turn ended
    speech_end_at: float | None = None  # perf_counter when the last speech sample arrived


InputEvent = SpeechBegan | Paused | Resumed | Silence | TurnEnded
_ARRIVALS_KEPT = 512  # appends remembered for `arrived_at` (10 s of 20 ms packets)


class InputPacer:
    """How long to wait before reading more audio from a client that sends it faster than
    `rate` x real time, after a free burst of `burst_s` seconds (a token bucket)."""

    def __init__(self, rate: float, burst_s: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self.clock = clock
        self._start = clock()
        self._received_s = 0.0

    def delay_after(self, seconds: float) -> float:
        """`seconds` of audio arrived: how long to wait before taking the next event."""
        self._received_s += seconds
        allowed = self.burst_s + self.rate * (self.clock() - self._start)
        return max(0.0, (self._received_s - allowed) / self.rate)


class InputBuffer:
    """What the client said since the last turn, and (server VAD) where its turns end."""

    def __init__(self, max_utterance_s: float) -> None:
        self.max_samples = int(max_utterance_s * SAMPLE_RATE)
        self.vad: vad.VadStream | None = None  # None: push-to-talk
        self.prefix_padding_ms = 0  # kept before detected speech
        self.speaking = False  # between a SpeechBegan and its TurnEnded
        self._audio = AudioChunks()
        self._speech_item: str | None = None
        self._pause: Paused | None = None  # the speech paused here (no turn end yet)
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=_ARRIVALS_KEPT)
        self.decoder = InputDecoder(DEFAULT_FORMAT)  # for parse_event: appends -> 16 kHz

    def use_format(self, fmt: AudioFormat) -> None:
        """Appends from now on are in `fmt`. Audio already appended was decoded in the
        format it came in and stays; a changed format starts a fresh resampler (what the old
        one held back, at most half its filter, a few ms, is dropped)."""
        if fmt != self.decoder.format:
            self.decoder = InputDecoder(fmt)

    @property
    def samples(self) -> int:
        return self._audio.size

    @property
    def stream_samples(self) -> int:
        """Samples received in this session."""
        return self._audio.end

    def append(self, audio: np.ndarray, continuous: bool = False) -> list[InputEvent]:
        """16 kHz mono float32 audio, in order. Raises ProtocolError for unusable audio, or
        for a push-to-talk buffer that overflowed (then cleared).

        `continuous`: a source that never stops (a WebRTC microphone track). In push-to-talk
        its buffer keeps the last `audio.max_utterance_s` instead of overflowing.
        """
        if audio.size == 0:
            return []
        if not np.isfinite(audio).all():
            raise p.ProtocolError("invalid_audio", "audio contains NaN or infinite samples")
        self._audio.append(audio)
        self._arrivals.append((self._audio.end, time.perf_counter()))
        if self.vad is None:
            if self._audio.size > self.max_samples and continuous:
                self._audio.cut_before(self._audio.end - self.max_samples)
            elif self._audio.size > self.max_samples:
                self._audio.cut_before(self._audio.end)
                raise p.ProtocolError(
                    "input_audio_buffer_full",
                    "the input audio buffer exceeded audio.max_utterance_s = "
                    f"{self.max_samples / SAMPLE_RATE:g} s and was cleared",
                )
            return []
        self.vad.feed(audio)
        return self._bound()

    def on_vad(self, events: list[vad.VadEvent]) -> list[InputEvent]:
        """The VAD worker's verdicts on this stream, in order."""
        out: list[InputEvent] = []
        for event in events:
            if isinstance(event, vad.SpeechStarted):
                out.append(self._speech_started(event.sample))
            elif not self.speaking:
                continue  # the turn this was about has already ended (limit, early end)
            elif isinstance(event, vad.SpeechPaused):
                turn_end = min(event.sample + int(TAIL_KEEP_S * SAMPLE_RATE), self._audio.end)
                self._pause = Paused(self._item(), event.sample, turn_end)
                out.append(self._pause)
            elif isinstance(event, vad.SpeechResumed):
                self._pause = None
                out.append(Resumed(self._item()))
            elif isinstance(event, vad.SilenceGrew):
                out.append(Silence(event.sample, event.silence_ms))
            elif event.sample - self._audio.start < MIN_COMMIT_S * SAMPLE_RATE:
                # The speech was already committed at audio.max_utterance_s and nothing (or
                # a sliver) followed it: no turn to answer.
                self._audio.cut_before(event.sample)
                self._end_speech()
            else:
                silence = self.vad.hysteresis.min_silence if self.vad is not None else 0
                out.append(self._speech_stopped(event.sample, "silence", samples_to_ms(silence)))
        return out

    def end_turn(self, pause: Paused, silence_ms: int, how: str) -> TurnEnded | None:
        """End the turn at `pause` before the silence does (the judge says it is over);
        None if that pause is no longer the current one."""
        if self._pause is None or self._pause.end != pause.end or not self.speaking:
            return None
        if self.vad is not None:
            self.vad.end_turn()  # speech from now on is a new turn
        return self._speech_stopped(pause.end, how, silence_ms)

    def peek(self, until: int) -> np.ndarray:
        """The turn's audio up to stream offset `until` (a copy; nothing is taken)."""
        return self._audio.peek_until(until)

    def arrived_at(self, sample: int) -> float | None:
        """perf_counter when stream offset `sample` arrived (None: too long ago)."""
        for end, at in self._arrivals:
            if end >= sample:
                return at
        return None

    def commit(self, event_id: str | None) -> np.ndarray:
        """Everything buffered, as the user's turn (push-to-talk or a manual commit)."""
        tail = self.decoder.flush()  # the end of what was appended, to the last sample
        if tail.size:
            self._audio.append(tail)
        if self._audio.size < MIN_COMMIT_S * SAMPLE_RATE:
            raise p.ProtocolError(
                "input_audio_buffer_commit_empty",
                f"buffer too small: expected at least {MIN_COMMIT_S * 1000:.0f} ms of audio, "
                f"have {samples_to_ms(self._audio.size)} ms",
                event_id,
            )
        audio = self._audio.take_all()
        self._restart_vad()
        return audio

    def clear(self) -> None:
        self.decoder.flush()  # the tail of the audio cleared
        self._audio.cut_before(self._audio.end)
        self._restart_vad()

    def use_vad(self, stream: vad.VadStream | None, prefix_padding_ms: int = 0) -> None:
        """Switch to `stream` (None: push-to-talk), which judges audio from now on."""
        self.vad = stream
        self.prefix_padding_ms = prefix_padding_ms
        self.speaking = False
        self._speech_item = None

    # ----------------------------------------------------------------- internals

    def _restart_vad(self) -> None:
        if self.vad is not None:
            self.vad.reset(self._audio.end)  # verdicts still on their way are stale
        self._end_speech()

    def _end_speech(self) -> None:
        self.speaking = False
        self._speech_item = None
        self._pause = None

    def _item(self) -> str:
        if self._speech_item is None:
            self._speech_item = p.new_id("item")
        return self._speech_item

    def _speech_started(self, sample: int) -> SpeechBegan:
        self._audio.cut_before(max(sample - ms_to_samples(self.prefix_padding_ms), 0))
        self.speaking = True
        self._pause = None
        self._speech_item = p.new_id("item")
        return SpeechBegan(self._speech_item, samples_to_ms(sample))

    def _speech_stopped(self, sample: int, how: str, silence_ms: float | None) -> TurnEnded:
        now = time.perf_counter()
        item = self._item()
        pause = self._pause
        # The same audio a run started at the pause was given, so that it can be kept.
        if pause is not None and pause.end == sample:
            end = pause.turn_end
        else:
            end = min(sample + int(TAIL_KEEP_S * SAMPLE_RATE), self._audio.end)
        self._end_speech()
        audio = self._audio.take_until(end)
        speech_end_at = self.arrived_at(sample)
        return TurnEnded(
            item, audio, samples_to_ms(sample), now, how, end, silence_ms, speech_end_at
        )

    def _bound(self) -> list[InputEvent]:
        """Idle: keep only what prefix padding may need. Speaking: end the turn at the limit."""
        assert self.vad is not None
        if not self.speaking:
            # Counted from what the VAD has judged, not from what arrived: its verdict on
            # newer audio (a speech start) may still be on its way.
            judged = min(self.vad.offset, self._audio.end)
            keep = ms_to_samples(self.prefix_padding_ms + _IDLE_KEEP_S * 1000)
            self._audio.cut_before(judged - keep)
        elif self._audio.size >= self.max_samples:
            # A monologue longer than the model takes: end the turn here, as if paused. The
            # VAD still hears speech, so going on talking is not a barge-in; the rest becomes
            # the next turn when the speaker does pause.
            ended = self._speech_stopped(self._audio.end, "limit", 0)
            self.speaking = True
            self._speech_item = p.new_id("item")
            return [ended]
        return []


def parse_event(raw: str | bytes, decoder: InputDecoder) -> tuple[p.ClientEvent, np.ndarray | None]:
    """The event, and an append's audio decoded to 16 kHz (ProtocolError for either).

    Appends must come through here in order, one at a time: `decoder` carries its resampler
    from one to the next.
    """
    event = p.parse_client_event(raw)
    if isinstance(event, p.InputAudioBufferAppend):
        try:
            return event, decoder.decode(event.audio)
        except p.ProtocolError as exc:
            exc.event_id = exc.event_id or event.event_id
            raise
    return event, None
