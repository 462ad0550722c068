"""G.711 (ITU-T) µ-law and A-law: 8-bit telephone samples <-> PCM16, by table lookup.

The algorithms are those of the ITU reference (and of CPython's old `audioop`): decoding is
a 256-entry table, encoding a 65,536-entry one built once from the same segment arithmetic,
so both directions are one numpy indexing pass, sample by sample (stateless).
"""

from __future__ import annotations

import numpy as np

RATE = 8000  # Hz: G.711 is defined at 8 kHz

_QUANT_MASK = 0x0F
_SEG_SHIFT = 4
_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # on the 14-bit magnitude
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = ((u & _QUANT_MASK) << 3) + _ULAW_BIAS
    t <<= (u & 0x70) >> _SEG_SHIFT
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & _QUANT_MASK) << 4
    seg = (a & 0x70) >> _SEG_SHIFT
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


def _ulaw_encode_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2  # 14-bit
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, magnitude)  # first segment whose end >= magnitude
    value = (seg << _SEG_SHIFT) | ((magnitude >> (np.minimum(seg, 7) + 1)) & _QUANT_MASK)
    value = np.where(seg >= 8, 0x7F, value)
    return _by_uint16((value ^ mask).astype(np.uint8))


def _alaw_encode_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3  # 13-bit
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    magnitude = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = np.searchsorted(_ALAW_SEG_END, magnitude)
    shift = np.where(seg < 2, 1, np.minimum(seg, 7))
    value = (seg << _SEG_SHIFT) | ((magnitude >> shift) & _QUANT_MASK)
    value = np.where(seg >= 8, 0x7F, value)
    return _by_uint16((value ^ mask).astype(np.uint8))


def _by_uint16(table: np.ndarray) -> np.ndarray:
    """A table indexed by int16 value + 32768 -> one indexed by the same bits as uint16."""
    return np.roll(table, -32768)


_ULAW_DECODE = _ulaw_decode_table()
_ALAW_DECODE = _alaw_decode_table()
_ULAW_ENCODE = _ulaw_encode_table()
_ALAW_ENCODE = _alaw_encode_table()


def ulaw_to_pcm16(data: bytes) -> np.ndarray:
    """µ-law bytes -> int16 samples (one per byte)."""
    return _ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def alaw_to_pcm16(data: bytes) -> np.ndarray:
    """A-law bytes -> int16 samples (one per byte)."""
    return _ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def pcm16_to_ulaw(pcm: np.ndarray) -> bytes:
    """int16 samples -> µ-law bytes."""
    return bytes(_ULAW_ENCODE[np.asarray(pcm, dtype=np.int16).view(np.uint16)].tobytes())


def pcm16_to_alaw(pcm: np.ndarray) -> bytes:
    """int16 samples -> A-law bytes."""
    return bytes(_ALAW_ENCODE[np.asarray(pcm, dtype=np.int16).view(np.uint16)].tobytes())
