"""A low-latency streaming resampler for live input audio (24 or 8 kHz -> Voxtral's 16 kHz).

soxr's streaming mode works in blocks: fed 20 ms at a time it holds back 20-40 ms at
24 -> 16 kHz and over 100 ms at 8 -> 16 kHz, which would delay every end-of-speech decision.
This one is a polyphase windowed-sinc FIR (Kaiser window), aligned so that output sample m
is the input at time m / to_rate (no added delay in the output's timeline): it returns every
sample whose filter window is complete, holding back only half a filter (~1.3 ms at 24 kHz
in, ~4 ms at 8 kHz in). Its state is the last few input samples, so any split of a stream
into chunks gives the same output as the whole stream at once: no clicks at chunk
boundaries.
"""

from __future__ import annotations

from math import gcd

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

TAPS_PER_PHASE = 64  # filter length in input samples: 64 -> a ~1.6 kHz transition band at 24k
_KAISER_BETA = 7.0  # ~70 dB stopband
_PASS_FRACTION = 0.9  # -6 dB point, as a fraction of the lower rate's Nyquist frequency
_MAX_UP = 64  # rate ratios with a larger numerator are refused (the filter would be huge)


def _odd_length(up: int, taps: int) -> int:
    """An odd filter length (its centre falls on a sample: no half-sample shift)."""
    return up * taps - 1 + (up * taps) % 2


def _filter_bank(up: int, down: int, taps: int) -> np.ndarray:
    """The polyphase filters, (up, taps) float32: row p applies to output samples whose
    position in the upsampled signal is p modulo `up`, oldest input first."""
    length = _odd_length(up, taps)
    cutoff = _PASS_FRACTION * 0.5 / max(up, down)  # cycles per upsampled sample
    n = np.arange(length) - (length - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(length, _KAISER_BETA)
    h *= up / h.sum()  # unit gain at DC after zero-stuffing by `up`
    h = np.concatenate([h, np.zeros(up * taps - length)])
    # h[p + up*i] multiplies input (b - i): row p, reversed so the window runs oldest first.
    return np.ascontiguousarray(h.reshape(taps, up).T[:, ::-1], dtype=np.float32)


class StreamResampler:
    """Mono float32 from `from_rate` to `to_rate` Hz, one stream, fed in chunks of any size.

    `feed` returns what is ready; `flush` returns the rest (the stream is over) and starts a
    new stream. Not thread-safe: one caller at a time.
    """

    def __init__(self, from_rate: int, to_rate: int, taps: int = TAPS_PER_PHASE) -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        g = gcd(from_rate, to_rate)
        self.up, self.down = to_rate // g, from_rate // g
        if self.up > _MAX_UP:
            raise ValueError(f"cannot resample {from_rate} -> {to_rate} Hz (ratio too fine)")
        self.from_rate, self.to_rate, self.taps = from_rate, to_rate, taps
        self._bank = _filter_bank(self.up, self.down, taps)
        # The filter's centre, in upsampled samples: output m reads around m*down + centre
        # - centre, i.e. it is aligned with the input.
        self._centre = (_odd_length(self.up, taps) - 1) // 2
        self._reset()

    @property
    def identity(self) -> bool:
        return self.up == self.down

    def _reset(self) -> None:
        self._history = np.zeros(self.taps - 1, np.float32)  # the last inputs, oldest first
        self._received = 0  # input samples fed since the stream began
        self._sent = 0  # output samples returned

    def feed(self, audio: np.ndarray) -> np.ndarray:
        """The next input samples -> the output samples now complete."""
        audio = np.asarray(audio, dtype=np.float32)
        if self.identity:
            return audio.copy()
        buffer = np.concatenate([self._history, audio])
        first = self._received - (self.taps - 1)  # stream index of buffer[0]
        self._received += audio.size
        self._history = buffer[buffer.size - (self.taps - 1) :]
        # Output m needs input up to index (m*down + centre) // up.
        ready = (self.up * self._received - 1 - self._centre) // self.down + 1
        if ready <= self._sent:
            return np.zeros(0, np.float32)
        first_out, self._sent = self._sent, ready
        windows = sliding_window_view(buffer, self.taps)  # windows[k] ends at buffer[k + taps-1]
        out = np.empty(ready - first_out, np.float32)
        # Outputs up samples apart share a filter phase and read windows `down` inputs apart:
        # one strided matrix-vector product per phase, no gathering.
        for r in range(min(self.up, out.size)):
            m = first_out + r
            t = m * self.down + self._centre
            start = t // self.up - (self.taps - 1) - first
            count = (out.size - r + self.up - 1) // self.up
            rows = windows[start : start + (count - 1) * self.down + 1 : self.down]
            out[r :: self.up] = rows @ self._bank[t % self.up]
        return out

    def flush(self) -> np.ndarray:
        """The samples still held (the stream ended); then ready for a new stream."""
        if self.identity:
            return np.zeros(0, np.float32)
        total = -(-self._received * self.up // self.down)  # ceil: every input's span
        missing = max(total - self._sent, 0)
        padding = np.zeros(self._centre // self.up + self.taps, np.float32)
        tail = self.feed(padding)[:missing]
        self._reset()
        return tail


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """One whole signal, the way the streaming resampler does it (float32)."""
    stream = StreamResampler(from_rate, to_rate)
    return np.concatenate([stream.feed(audio), stream.flush()])
