"""What an end-of-turn judge is: the `TurnJudge` protocol and its load error.

A judge answers one question about a turn in progress: how likely is it that the speaker has
finished? The session asks it when the silence timer has not yet decided, and combines its
answer with other signals (silence length, hysteresis, the engine's view of the words).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class TurnJudgeUnavailable(RuntimeError):
    """The judge cannot be loaded here; the message names the package to install."""


class TurnJudge(Protocol):
    name: str  # "smart_turn"

    def completeness(self, audio: np.ndarray) -> float:
        """P(the speaker has finished) in [0, 1] for 16 kHz mono float32 `audio`: the turn so
        far, trailing silence included (the judge looks at as much of its end as it needs).

        Blocking (tens of ms on a small CPU): run it off the event loop, one call at a time
        per judge. Raises ValueError for audio that is not one-dimensional.
        """
        ...

    def close(self) -> None:
        """Free the model (idempotent). `completeness` after `close` raises RuntimeError."""
        ...
