"""End-of-turn detection over 16 kHz mono audio with Silero VAD (its model ships in the wheel).

One `TurnDetector` per conversation (Silero keeps state between frames). Feed it any amount
of audio; it runs the model on each 32 ms frame and reports when speech starts and when it
has been followed by `min_silence_ms` of silence, as sample offsets in the stream.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .audio import SAMPLE_RATE

# `import silero_vad` sets torch's thread count to 1 for the whole process; undo that.
_threads = torch.get_num_threads()
import silero_vad  # noqa: E402

torch.set_num_threads(_threads)

FRAME_MS = 32  # what Silero takes at 16 kHz
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 512


@dataclass(frozen=True)
class SpeechStarted:
    sample: int  # offset in the stream where speech began


@dataclass(frozen=True)
class SpeechStopped:
    sample: int  # offset in the stream where speech ended (before the silence)


VadEvent = SpeechStarted | SpeechStopped


def _warm(model: Any) -> Any:
    """Run a second of noise through a fresh model, then clear its state.

    TorchScript profiles and re-optimises a module's graph over its first calls, so a new
    model's first frames are far slower than the rest: pay that at start-up, not during
    somebody's first utterance.
    """
    noise = np.random.default_rng(0).standard_normal(SAMPLE_RATE).astype(np.float32) * 0.1
    with torch.inference_mode():
        for start in range(0, noise.size - FRAME_SAMPLES + 1, FRAME_SAMPLES):
            model(torch.from_numpy(noise[start : start + FRAME_SAMPLES]), SAMPLE_RATE)
    model.reset_states()
    return model


class ModelPool:
    """Silero models kept from one conversation to the next (thread-safe).

    A model costs ~40 ms of CPU to load, its first frames run TorchScript's optimisation
    passes, and freeing one holds the GIL for ~10 ms, which stalls the event loop and the
    engine worker alike. Conversations take a warm model and give it back when they end.
    """

    def __init__(self, max_idle: int) -> None:
        self._idle: list[Any] = []
        self._max_idle = max_idle
        self._lock = threading.Lock()

    def warm_up(self, count: int = 1) -> None:
        models = [_warm(silero_vad.load_silero_vad()) for _ in range(count)]
        with self._lock:
            self._idle.extend(models[: max(self._max_idle - len(self._idle), 0)])

    def acquire(self) -> Any:
        """A warm model with fresh state: an idle one, else a new one (blocks ~50 ms)."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _warm(silero_vad.load_silero_vad())

    def release(self, model: Any) -> None:
        model.reset_states()
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(model)

    @property
    def idle(self) -> int:
        return len(self._idle)


class TurnDetector:
    def __init__(
        self,
        threshold: float = 0.5,
        min_silence_ms: int = 500,
        start_sample: int = 0,
        model: Any = None,
    ) -> None:
        """`model`: a Silero model from a `ModelPool` (None: load one here)."""
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        self.model = model if model is not None else _warm(silero_vad.load_silero_vad())
        self.threshold = threshold
        self._release = max(threshold - 0.15, 0.01)  # hysteresis, as Silero's own iterator
        self._min_silence = int(min_silence_ms * SAMPLE_RATE / 1000)
        self._pending = np.zeros(0, np.float32)
        self._offset = start_sample  # stream offset of the next sample fed
        self.speaking = False
        self._silence_from: int | None = None

    def start_at(self, sample: int) -> None:
        """Start afresh: the next audio fed begins at this stream offset."""
        self.reset()
        self._offset = sample

    def reset(self) -> None:
        """Forget speech state; offsets keep counting (dropped samples included)."""
        self.model.reset_states()
        self._offset += self._pending.size
        self._pending = np.zeros(0, np.float32)
        self.speaking = False
        self._silence_from = None

    def feed(self, audio: np.ndarray) -> list[VadEvent]:
        """Audio in (any length); events for every complete 32 ms frame, in order."""
        self._pending = np.concatenate([self._pending, audio.astype(np.float32, copy=False)])
        events: list[VadEvent] = []
        while self._pending.size >= FRAME_SAMPLES:
            frame, self._pending = (
                self._pending[:FRAME_SAMPLES],
                self._pending[FRAME_SAMPLES:],
            )
            start = self._offset
            self._offset += FRAME_SAMPLES
            with torch.inference_mode():
                prob = float(self.model(torch.from_numpy(frame.copy()), SAMPLE_RATE).item())
            if prob >= self.threshold:
                self._silence_from = None
                if not self.speaking:
                    self.speaking = True
                    events.append(SpeechStarted(start))
            elif self.speaking and prob < self._release:
                if self._silence_from is None:
                    self._silence_from = start
                elif self._offset - self._silence_from >= self._min_silence:
                    events.append(SpeechStopped(self._silence_from))
                    self.speaking = False
                    self._silence_from = None
        return events
