"""Text to speech: one phrase in, mono 16-bit PCM chunks out as soon as they are synthesised.

Engines (`tts.engine`):
  - `espeak`: the espeak-ng program (Debian package `espeak-ng`), run as a separate process per
    phrase. espeak-ng is GPL-3, so it is only ever run as a program, never linked or imported.
    22.05 kHz, robotic but instant: first chunk ~10 ms after the call, real-time factor < 0.01
    (2 CPU cores).
  - `kokoro`: Kokoro-82M (Apache-2.0 weights) through the optional `kokoro` package
    (`pip install 'voxtral-server[kokoro]'`), for GPU hosts. 24 kHz. See docs/tts.md.
  - `none`: `load_tts` returns None; answers stay text only.

Engines yield audio at their own `sample_rate`; `audio.PcmResampler` converts one audio
stream to the rate a transport needs without clicks at chunk boundaries.
"""

from __future__ import annotations

from ...config import Settings
from .base import CHUNK_MS, TtsEngine, TtsError, TtsLoadError
from .espeak import ESPEAK_DEFAULT_VOICE, EspeakTts
from .kokoro import KOKORO_DEFAULT_VOICE, KokoroTts

__all__ = ["CHUNK_MS", "TtsEngine", "TtsError", "TtsLoadError", "load_tts"]


def load_tts(settings: Settings) -> TtsEngine | None:
    """The engine `settings.tts` asks for, ready to speak; None for `tts.engine: none`.

    Raises TtsLoadError, naming what is missing and how to get it, when the engine cannot be
    used (espeak-ng not installed or the voice unknown; the kokoro packages, weights or voice
    missing).
    """
    tts = settings.tts
    if tts.engine == "none":
        return None
    if tts.engine == "espeak":
        return EspeakTts(voice=tts.voice or ESPEAK_DEFAULT_VOICE, speed=tts.speed)
    if tts.engine == "kokoro":
        return KokoroTts.load(
            tts.model, voice=tts.voice or KOKORO_DEFAULT_VOICE, speed=tts.speed, device=tts.device
        )
    raise TtsLoadError(f"unknown tts.engine {tts.engine!r}: expected none, espeak or kokoro")
