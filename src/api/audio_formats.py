"""The audio formats of the Realtime API's WebSocket: what a session declares, and the
conversions between the wire and Voxtral's 16 kHz.

`audio/pcm` is PCM16 little-endian mono at 24 kHz (OpenAI's only rate, and the default of a
session that declares nothing); this server also takes `rate: 16000` (Voxtral's own rate, so
nothing is resampled). `audio/pcmu` and `audio/pcma` are G.711 µ-law and A-law at 8 kHz.
Input is decoded and resampled to 16 kHz as it arrives (`InputDecoder`, one per session, so
the resampler runs across appends without clicks); output speech is resampled by the speech
pipeline to the format's rate and encoded here (`encode_audio`, stateless).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..models import g711
from ..models.audio import PCM16_SCALE, SAMPLE_RATE, AudioInputError, pcm16_to_float
from ..models.resample import StreamResampler
from . import protocol as p

FormatType = Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
PCM_RATES = (24000, SAMPLE_RATE)  # OpenAI's rate, and Voxtral's (an extension)
G711_TYPES: tuple[FormatType, ...] = ("audio/pcmu", "audio/pcma")


@dataclass(frozen=True)
class AudioFormat:
    type: FormatType
    rate: int

    def describe(self) -> dict[str, Any]:
        """The format as session.created / session.updated report it (GA shape)."""
        if self.type == "audio/pcm":
            return {"type": self.type, "rate": self.rate}
        return {"type": self.type}

    def __str__(self) -> str:
        return f"{self.type} at {self.rate} Hz"


DEFAULT_FORMAT = AudioFormat("audio/pcm", 24000)
PCM16K = AudioFormat("audio/pcm", SAMPLE_RATE)


def audio_format(given: p.AudioFormatConfig, field: str) -> AudioFormat:
    """A session.update's format -> an AudioFormat, or ProtocolError
    `unsupported_audio_format` naming what was asked and what is possible."""
    kind = given.type or "audio/pcm"
    if kind == "audio/pcm":
        rate = given.rate if given.rate is not None else DEFAULT_FORMAT.rate
        if rate in PCM_RATES:
            return AudioFormat("audio/pcm", rate)
        raise p.ProtocolError(
            "unsupported_audio_format",
            f"{field}: audio/pcm at {rate} Hz is not supported; rate must be 24000 "
            f"(or {SAMPLE_RATE}, this server's extension)",
        )
    for g711_type in G711_TYPES:
        if kind != g711_type:
            continue
        if given.rate is not None and given.rate != g711.RATE:
            raise p.ProtocolError(
                "unsupported_audio_format",
                f"{field}: {kind} is always {g711.RATE} Hz, not {given.rate}",
            )
        return AudioFormat(g711_type, g711.RATE)
    raise p.ProtocolError(
        "unsupported_audio_format",
        f"{field}: unsupported audio format type {kind!r}; supported: audio/pcm (24000 or "
        f"{SAMPLE_RATE} Hz), audio/pcmu, audio/pcma",
    )


class InputDecoder:
    """input_audio_buffer.append payloads of one session, in order -> 16 kHz float32.

    The resampler keeps a few ms of each append back (half its filter: 1.3 ms of 24 kHz,
    4 ms of 8 kHz) and releases them with the next, so a stream cut into appends anywhere
    decodes to the same samples; `flush` releases them when the stream ends.
    """

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        self._resampler = StreamResampler(fmt.rate, SAMPLE_RATE)

    def decode(self, b64: str) -> np.ndarray:
        """One append's base64 audio -> float32 samples at 16 kHz, or a ProtocolError."""
        try:
            # One strict pass (alphabet, padding) over the str, holding the GIL about half as
            # long as b64decode(validate=True): its regex, then a second decoding pass.
            data = binascii.a2b_base64(b64, strict_mode=True)
        except (binascii.Error, ValueError):  # ValueError: not ASCII
            raise p.ProtocolError("invalid_audio", "audio is not valid base64") from None
        if self.format.type == "audio/pcmu":
            samples = g711.ulaw_to_pcm16(data).astype(np.float32) / PCM16_SCALE
        elif self.format.type == "audio/pcma":
            samples = g711.alaw_to_pcm16(data).astype(np.float32) / PCM16_SCALE
        else:
            try:
                samples = pcm16_to_float(data)
            except AudioInputError as exc:
                raise p.ProtocolError("invalid_audio", str(exc)) from None
        return self._resampler.feed(samples)

    def flush(self) -> np.ndarray:
        """The stream ended (a commit, a clear): the samples the resampler still holds.
        The next append starts a new stream."""
        return self._resampler.flush()


def encode_audio(pcm: np.ndarray, fmt: AudioFormat) -> bytes:
    """int16 mono samples, already at `fmt.rate` -> the bytes of `fmt`."""
    if fmt.type == "audio/pcmu":
        return g711.pcm16_to_ulaw(pcm)
    if fmt.type == "audio/pcma":
        return g711.pcm16_to_alaw(pcm)
    return bytes(np.asarray(pcm).astype("<i2", copy=False).tobytes())
