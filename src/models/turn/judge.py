"""Load an end-of-turn judge by name. The protocol and its error live in `base`; they are
re-exported here so callers need one import."""

from __future__ import annotations

from .base import TurnJudge, TurnJudgeUnavailable

__all__ = ["JUDGE_KINDS", "TurnJudge", "TurnJudgeUnavailable", "load_turn_judge"]

JUDGE_KINDS = ("smart_turn",)


def load_turn_judge(kind: str = "smart_turn", *, threads: int = 1) -> TurnJudge:
    """Load and warm up a judge of `kind`, running on `threads` CPU threads.

    One thread by default: the judge runs next to the engine and the VAD, and on a small
    machine a judge using every core would slow them down. Raises TurnJudgeUnavailable when
    its package or model cannot be loaded, ValueError for an unknown kind or thread count.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if kind == "smart_turn":
        from .smart_turn import SmartTurnJudge

        return SmartTurnJudge(threads=threads)
    raise ValueError(f"unknown turn judge {kind!r}; known: {', '.join(JUDGE_KINDS)}")
