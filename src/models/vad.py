"""End-of-turn detection over 16 kHz mono audio with Silero VAD (its model ships in the wheel).

One `TurnDetector` per conversation (Silero keeps state between frames). Feed it any amount
of audio; it runs the model on each 32 ms frame and reports when speech starts and when it
has been followed by `min_silence_ms` of silence, as sample offsets in the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .audio import SAMPLE_RATE

# `import silero_vad` sets torch's thread count to 1 for the whole process; undo that.
_threads = torch.get_num_threads()
import silero_vad  # noqa: E402

torch.set_num_threads(_threads)

FRAME_SAMPLES = 512  # what Silero takes at 16 kHz: 32 ms


@dataclass(frozen=True)
class SpeechStarted:
    sample: int  # offset in the stream where speech began


@dataclass(frozen=True)
class SpeechStopped:
    sample: int  # offset in the stream where speech ended (before the silence)


VadEvent = SpeechStarted | SpeechStopped


class TurnDetector:
    def __init__(
        self, threshold: float = 0.5, min_silence_ms: int = 500, start_sample: int = 0
    ) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        self._model = silero_vad.load_silero_vad()
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
        self._model.reset_states()
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
                prob = float(self._model(torch.from_numpy(frame.copy()), SAMPLE_RATE).item())
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
