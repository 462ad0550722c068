"""What every speech engine is: the `TtsEngine` protocol, its errors, the chunk size."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from ..types import EngineError

CHUNK_MS = 100  # longest chunk an engine yields: a caller can stop the audio at this granularity


class TtsError(EngineError):
    """Synthesis of a phrase failed."""

    def __init__(self, message: str) -> None:
        super().__init__("tts_failed", message)


class TtsLoadError(EngineError):
    """The configured engine cannot be used; the message says what is missing and how to get
    it."""

    def __init__(self, message: str) -> None:
        super().__init__("tts_load_failed", message)


class TtsEngine(Protocol):
    name: str  # "espeak" | "kokoro"
    sample_rate: int  # Hz of the PCM that `stream` yields

    def stream(self, text: str) -> Iterator[np.ndarray]:
        """Speak one phrase: yield mono int16 PCM chunks at `sample_rate`, each as soon as it
        is synthesised and none longer than CHUNK_MS.

        Blocking: iterate on a worker thread. Closing the iterator early (`close()`, or
        breaking out of a for loop) stops synthesis and frees what it holds. Raises TtsError
        on failure. Empty or whitespace-only text yields nothing.
        """
        ...

    def close(self) -> None:
        """Free the engine (idempotent); streams still running end early."""
        ...


def to_chunks(pcm: np.ndarray, chunk_samples: int) -> Iterator[np.ndarray]:
    """`pcm` in slices of at most `chunk_samples`."""
    for start in range(0, pcm.size, chunk_samples):
        yield pcm[start : start + chunk_samples]
