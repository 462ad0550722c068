"""The input audio buffer and server-VAD turns: audio in -> speech started / turn ended.

Pure bookkeeping over sample offsets in the session's stream (no events sent from here):
`InputBuffer.append` returns what happened and the session turns that into events, a
response or a barge-in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ...models import vad
from ...models.audio import SAMPLE_RATE
from .. import protocol as p

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
class TurnEnded:
    """A spoken turn is over (the speaker paused, or reached audio.max_utterance_s)."""

    item_id: str
    audio: np.ndarray
    audio_end_ms: int
    at: float  # perf_counter when the end was detected


InputEvent = SpeechBegan | TurnEnded


class InputBuffer:
    """What the client said since the last turn, and (server VAD) where its turns end."""

    def __init__(self, max_utterance_s: float) -> None:
        self.max_samples = int(max_utterance_s * SAMPLE_RATE)
        self.detector: vad.TurnDetector | None = None  # None: push-to-talk
        self.prefix_padding_ms = 0  # kept before detected speech
        self._buffer = np.zeros(0, np.float32)
        self._buffer_start = 0  # stream offset (samples) of _buffer[0]
        self.stream_samples = 0  # samples received in this session
        self._speech_item: str | None = None

    @property
    def samples(self) -> int:
        return int(self._buffer.size)

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
        self.stream_samples += audio.size
        self._buffer = np.concatenate([self._buffer, audio])
        if self.detector is None:
            if self._buffer.size > self.max_samples and continuous:
                self._cut_before(self.stream_samples - self.max_samples)
            elif self._buffer.size > self.max_samples:
                self._drop_all()
                raise p.ProtocolError(
                    "input_audio_buffer_full",
                    "the input audio buffer exceeded audio.max_utterance_s = "
                    f"{self.max_samples / SAMPLE_RATE:g} s and was cleared",
                )
            return []
        events: list[InputEvent] = []
        for event in self.detector.feed(audio):
            if isinstance(event, vad.SpeechStarted):
                events.append(self._speech_started(event.sample))
            else:
                events.append(self._speech_stopped(event.sample))
        events.extend(self._bound())
        return events

    def commit(self, event_id: str | None) -> np.ndarray:
        """Everything buffered, as the user's turn (push-to-talk or a manual commit)."""
        if self._buffer.size < MIN_COMMIT_S * SAMPLE_RATE:
            raise p.ProtocolError(
                "input_audio_buffer_commit_empty",
                f"buffer too small: expected at least {MIN_COMMIT_S * 1000:.0f} ms of audio, "
                f"have {samples_to_ms(self._buffer.size)} ms",
                event_id,
            )
        audio = self._buffer
        self._drop_all()
        if self.detector is not None:
            self.detector.reset()
        self._speech_item = None
        return audio

    def clear(self) -> None:
        self._drop_all()
        if self.detector is not None:
            self.detector.reset()

    def use_detector(
        self, detector: vad.TurnDetector | None, prefix_padding_ms: int = 0
    ) -> vad.TurnDetector | None:
        """Switch to `detector` (None: push-to-talk); returns the one it replaces."""
        old, self.detector = self.detector, detector
        self.prefix_padding_ms = prefix_padding_ms
        if detector is not None:
            # Its offsets count from here: audio received so far is not re-fed.
            detector.start_at(self.stream_samples)
        return old

    # ----------------------------------------------------------------- internals

    def _speech_started(self, sample: int) -> SpeechBegan:
        self._cut_before(max(sample - ms_to_samples(self.prefix_padding_ms), 0))
        self._speech_item = p.new_id("item")
        return SpeechBegan(self._speech_item, samples_to_ms(sample))

    def _speech_stopped(self, sample: int) -> TurnEnded:
        now = time.perf_counter()
        item = self._speech_item or p.new_id("item")
        self._speech_item = None
        end = max(sample + int(TAIL_KEEP_S * SAMPLE_RATE) - self._buffer_start, 0)
        audio, self._buffer = self._buffer[:end], self._buffer[end:]
        self._buffer_start += audio.size
        return TurnEnded(item, audio, samples_to_ms(sample), now)

    def _bound(self) -> list[InputEvent]:
        """Idle: keep only what prefix padding may need. Speaking: end the turn at the limit."""
        assert self.detector is not None
        if not self.detector.speaking:
            keep_ms = self.prefix_padding_ms + _IDLE_KEEP_S * 1000
            self._cut_before(self.stream_samples - ms_to_samples(keep_ms))
        elif self._buffer.size >= self.max_samples:
            # A monologue longer than the model takes: end the turn here, as if paused. The
            # detector still hears speech, so going on talking is not a barge-in; the rest
            # becomes the next turn when the speaker does pause.
            ended = self._speech_stopped(self.stream_samples)
            self._speech_item = p.new_id("item")
            return [ended]
        return []

    def _cut_before(self, sample: int) -> None:
        drop = min(max(sample - self._buffer_start, 0), self._buffer.size)
        self._buffer = self._buffer[drop:]
        self._buffer_start += drop

    def _drop_all(self) -> None:
        self._buffer = np.zeros(0, np.float32)
        self._buffer_start = self.stream_samples
