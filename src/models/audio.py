"""Audio units and pure conversions: decoding, 16 kHz mono float32, PCM16, resampling,
validation."""

from __future__ import annotations

import io
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000  # Hz, what Voxtral's encoder expects
PCM16_SCALE = 32768.0  # int16 <-> float in [-1, 1): the one scale used both ways
_PCM16_MIN, _PCM16_MAX = -32768, 32767


class AudioInputError(ValueError):
    """The audio cannot be used; the message says why in words a user understands."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """(n,) or (n, channels) samples at any rate -> (n',) float32 at 16 kHz."""
    if sample_rate <= 0:
        raise AudioInputError("invalid_audio", f"sample rate must be positive, got {sample_rate}")
    data = np.asarray(samples)
    if data.ndim == 2:
        data = data.mean(axis=1)
    elif data.ndim != 1:
        raise AudioInputError("invalid_audio", f"expected 1 or 2 dimensions, got {data.ndim}")
    data = data.astype(np.float32, copy=False)
    if sample_rate != SAMPLE_RATE and data.size:
        data = soxr.resample(data, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return data


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    """Little-endian PCM16 bytes -> float32 in [-1, 1)."""
    if len(pcm) % 2:
        raise AudioInputError(
            "invalid_audio", f"PCM16 needs an even number of bytes, got {len(pcm)}"
        )
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / PCM16_SCALE


def float_to_pcm16(audio: np.ndarray) -> np.ndarray:
    """float samples (clipped to [-1, 1]) -> int16, the inverse of `pcm16_to_float`."""
    scaled = np.round(np.asarray(audio, dtype=np.float32) * PCM16_SCALE)
    return np.clip(scaled, _PCM16_MIN, _PCM16_MAX).astype(np.int16)


def read_audio_file(path: Path) -> np.ndarray:
    """Decode any format libsndfile reads (wav, flac, ogg, mp3, ...) -> 16 kHz mono float32."""
    if not path.is_file():
        raise AudioInputError("unreadable_audio", f"{path}: no such file")
    return _decode(str(path), str(path))


def read_audio_bytes(data: bytes, what: str) -> np.ndarray:
    """An audio file's bytes (any format libsndfile reads) -> 16 kHz mono float32; `what`
    names it in errors."""
    if not data:
        raise AudioInputError("empty_audio", f"{what} is empty")
    return _decode(io.BytesIO(data), what)


def _decode(source: str | io.BytesIO, what: str) -> np.ndarray:
    try:
        samples, rate = sf.read(source, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as exc:
        detail = getattr(exc, "error_string", None) or str(exc)  # libsndfile's own words
        raise AudioInputError(
            "unreadable_audio", f"{what}: cannot decode audio ({detail})"
        ) from None
    return to_mono_16k(samples, int(rate))


def validate(audio: np.ndarray, max_seconds: float) -> np.ndarray:
    """Refuse audio the model cannot answer; return it as contiguous float32."""
    if audio.ndim != 1:
        raise AudioInputError("invalid_audio", "audio must be mono (one dimension)")
    if audio.size == 0:
        raise AudioInputError("empty_audio", "the audio is empty: nothing was recorded")
    if not np.isfinite(audio).all():
        raise AudioInputError("invalid_audio", "the audio contains NaN or infinite samples")
    seconds = audio.size / SAMPLE_RATE
    if seconds > max_seconds:
        raise AudioInputError(
            "audio_too_long",
            f"the audio lasts {seconds:.1f} s, longer than "
            f"audio.max_utterance_s = {max_seconds:g} s",
        )
    return np.ascontiguousarray(audio, dtype=np.float32)


def wav_bytes(audio: np.ndarray) -> bytes:
    """16 kHz mono float32 -> PCM16 WAV bytes (what mistral_common's tokenizer reads)."""
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _check_pcm16(pcm: np.ndarray) -> np.ndarray:
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise ValueError(f"expected mono int16 PCM (1-D), got {pcm.dtype} with shape {pcm.shape}")
    return np.ascontiguousarray(pcm)


def resample_pcm16(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """One whole mono int16 signal from `from_rate` to `to_rate` Hz (int16 out)."""
    pcm = _check_pcm16(pcm)
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    if from_rate == to_rate or pcm.size == 0:
        return pcm.copy()
    out: np.ndarray = soxr.resample(pcm, from_rate, to_rate, quality="HQ")
    return out


class PcmResampler:
    """Streaming mono int16 resampler: one per audio stream, so chunk boundaries make no clicks.

    `feed` returns what is ready so far (the filter holds back a few ms, so the first outputs
    are shorter than the input implies); `flush` returns the tail and makes the resampler ready
    for a new, unrelated stream. Concatenating every output matches resampling the whole signal
    at once (to +-2 LSB). Not thread-safe: feed it from one thread.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._stream: Any = None if from_rate == to_rate else self._new_stream()

    def _new_stream(self) -> Any:
        return soxr.ResampleStream(self.from_rate, self.to_rate, 1, dtype="int16", quality="HQ")

    def feed(self, pcm: np.ndarray) -> np.ndarray:
        pcm = _check_pcm16(pcm)
        if self._stream is None:
            return pcm.copy()
        out: np.ndarray = self._stream.resample_chunk(pcm)
        return out

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, dtype=np.int16)
        out: np.ndarray = self._stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        # A new stream rather than soxr's clear(), which leaves state behind (outputs then
        # differ by an LSB from a fresh resampler's).
        self._stream = self._new_stream()
        return out


class AudioChunks:
    """Samples [start, end) of a stream, kept as the chunks that brought them: appending
    never copies, and what is taken is joined once."""

    def __init__(self) -> None:
        self._chunks: deque[np.ndarray] = deque()
        self.start = 0  # stream offset of the first sample held
        self.end = 0  # stream offset after the last sample held

    @property
    def size(self) -> int:
        return self.end - self.start

    def append(self, audio: np.ndarray) -> None:
        self._chunks.append(audio)
        self.end += audio.size

    def cut_before(self, sample: int) -> None:
        """Drop what comes before stream offset `sample`."""
        drop = min(max(sample - self.start, 0), self.size)
        while drop:
            head = self._chunks[0]
            if head.size <= drop:
                self._chunks.popleft()
                drop -= head.size
                self.start += head.size
            else:
                self._chunks[0] = head[drop:]
                self.start += drop
                drop = 0

    def take_until(self, sample: int) -> np.ndarray:
        """Remove and return the samples before stream offset `sample`, joined."""
        audio = self.peek_until(sample)
        self.cut_before(self.start + audio.size)
        return audio

    def take_all(self) -> np.ndarray:
        return self.take_until(self.end)

    def peek_until(self, sample: int) -> np.ndarray:
        """The samples before stream offset `sample`, joined, left in place."""
        parts: list[np.ndarray] = []
        wanted = min(max(sample - self.start, 0), self.size)
        for chunk in self._chunks:
            if not wanted:
                break
            parts.append(chunk[:wanted])
            wanted -= parts[-1].size
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def peak(self) -> float:
        """The largest absolute sample held (0.0 when empty)."""
        return max((float(np.abs(c).max()) for c in self._chunks if c.size), default=0.0)
