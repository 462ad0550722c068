"""Client events as the tests' WebSocket and data-channel clients send them.

The tests' audio is 16 kHz (Voxtral's rate); a session that declares nothing takes OpenAI's
24 kHz, so every such client first sends `session.update` with `audio/pcm` at 16000 Hz (this
server's extension): `PCM16K` inside their own update, or `DECLARE_16K` alone.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

PCM16K = {"type": "audio/pcm", "rate": 16000}


def session_update(session: dict[str, Any] | None = None, **audio_input: Any) -> str:
    """`session.update` of `session`, with 16 kHz input and the given audio.input fields."""
    session = dict(session or {})
    audio = dict(session.get("audio") or {})
    audio["input"] = {**(audio.get("input") or {}), "format": PCM16K, **audio_input}
    session["audio"] = audio
    return json.dumps({"type": "session.update", "session": session})


DECLARE_16K = session_update()
PUSH_TO_TALK = session_update(turn_detection=None)


def pcm16_b64(audio: np.ndarray) -> str:
    """16 kHz float audio -> base64 PCM16 little-endian."""
    return base64.b64encode((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def append_event(audio: np.ndarray) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_b64(audio)})


def appends(audio: np.ndarray, chunk_ms: int = 40) -> list[str]:
    """16 kHz float audio -> appends of `chunk_ms` each."""
    step = 16 * chunk_ms
    return [append_event(audio[i : i + step]) for i in range(0, audio.size, step)]
