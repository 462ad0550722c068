"""libopus through ctypes: Opus packets decoded straight to 16 kHz mono, losses concealed.

PyAV's libopus decoder (what aiortc uses) always decodes at 48 kHz, which then needs a
resampler per call; libopus itself decodes at 8, 12, 16, 24 or 48 kHz (SILK speech at
16 kHz needs no resampling at all), and conceals a lost packet when asked. The library
is the one PyAV bundles (its wheels carry libopus), else the system's; `load_libopus()` is
None when neither is found, and the caller decodes with PyAV instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from pathlib import Path

import av
import numpy as np

from ...models.audio import PCM16_SCALE, SAMPLE_RATE

logger = logging.getLogger(__name__)

MAX_FRAME_MS = 120  # the longest Opus packet
_MAX_SAMPLES = SAMPLE_RATE * MAX_FRAME_MS // 1000


def _candidates() -> list[str]:
    package = Path(av.__file__).parent
    bundled = [
        *package.parent.glob("av.libs/libopus*.so*"),  # Linux wheels (auditwheel)
        *package.glob(".dylibs/libopus*.dylib"),  # macOS wheels (delocate)
    ]
    system = ctypes.util.find_library("opus")
    return [str(p) for p in bundled] + ([system] if system else [])


@functools.cache
def load_libopus() -> ctypes.CDLL | None:
    """The library with the three functions declared, or None."""
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [
            ctypes.c_int32,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int),
        ]
        lib.opus_decode.restype = ctypes.c_int
        lib.opus_decode.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int32,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.opus_decoder_destroy.restype = None
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        logger.debug("libopus from %s", path)
        return lib
    return None


class OpusError(RuntimeError):
    """libopus refused a packet (the code's meaning is in opus_defines.h)."""


class OpusDecoder:
    """One stream's decoder state, at 16 kHz mono. Not thread-safe."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        error = ctypes.c_int()
        self._state = lib.opus_decoder_create(SAMPLE_RATE, 1, ctypes.byref(error))
        if not self._state or error.value != 0:
            raise OpusError(f"opus_decoder_create failed ({error.value})")
        self._pcm = np.zeros(_MAX_SAMPLES, np.int16)
        self._out = self._pcm.ctypes.data

    def decode(self, packet: bytes | None, samples: int = _MAX_SAMPLES) -> np.ndarray:
        """float32 samples of one packet; None conceals `samples` lost samples (a multiple of
        2.5 ms) from what came before."""
        n = self._lib.opus_decode(
            self._state, packet, len(packet) if packet else 0, self._out, samples, 0
        )
        if n < 0:
            raise OpusError(f"opus_decode failed ({n})")
        pcm = self._pcm[:n].astype(np.float32)
        pcm /= PCM16_SCALE
        return pcm

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            self._lib.opus_decoder_destroy(self._state)
            self._state = None
