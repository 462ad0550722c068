"""How an engine reports its batched steps (for /metrics), without tensors or web code."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class StepObserver(Protocol):
    """Told about every prefill and decode step, on the engine's thread."""

    def prefill_step(self, seconds: float, tokens: int) -> None:
        """Prompt tokens prefilled between two decode steps, and how long it took."""
        ...

    def decode_step(self, seconds: float, batch: int) -> None:
        """One decode step: how many answers it advanced, and how long it took."""
        ...


@runtime_checkable
class ObservableEngine(Protocol):
    def observe_steps(self, observer: StepObserver) -> None: ...
