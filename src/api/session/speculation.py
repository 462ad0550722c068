"""An answer started while the speaker pauses, before anyone knows the turn is over.

When the VAD hears speech stop, the session submits the turn as it would be committed now
(`Request.speculative`: the engine serves it after every confirmed turn and stops it for one)
and holds every chunk here. If the pause becomes the end of the turn, the session promotes
the run to its answer and the held words go out at once; if the speaker goes on, the run is
cancelled and its words are never seen. `SpeculationStats` counts both, and the engine time
thrown away.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...models.types import Chunk, RequestHandle


@dataclass
class Speculation:
    id: str  # the response id it will have if kept
    handle: RequestHandle
    turn_end: int  # stream offset where its audio ends (the commit must end there too)
    turns: int  # the session's answered turns when it started (its history)
    held: list[Chunk] = field(default_factory=list)

    @property
    def final(self) -> Chunk | None:
        return self.held[-1] if self.held and self.held[-1].is_final else None

    @property
    def usable(self) -> bool:
        """Still worth keeping: not cancelled (the engine preempts speculative runs)."""
        final = self.final
        if final is not None:
            return final.totals is not None and final.totals.status == "completed"
        return not self.handle.cancelled


@dataclass
class SpeculationStats:
    """Counts since the last answered turn (for its log line) and in total (/metrics)."""

    started: int = 0
    kept: int = 0
    discarded: int = 0
    wasted_ms: float = 0.0  # engine time spent on runs that were discarded

    def reset(self) -> SpeculationStats:
        """These counts; start again from zero."""
        out = SpeculationStats(self.started, self.kept, self.discarded, self.wasted_ms)
        self.started = self.kept = self.discarded = 0
        self.wasted_ms = 0.0
        return out


def engine_ms(chunk: Chunk) -> float:
    """Engine time a run took, from its final chunk (queue wait excluded)."""
    totals = chunk.totals
    if totals is None:
        return 0.0
    return max(totals.total_ms - totals.queue_wait_ms, 0.0)
