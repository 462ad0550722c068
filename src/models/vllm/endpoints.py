"""The vLLM endpoints a front routes turns to: their health and the probes' backoff."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


def probe_delays(first_s: float, max_s: float) -> Iterator[float]:
    """Seconds to wait before each /health probe of a down endpoint: doubling, capped."""
    delay = first_s
    while True:
        yield min(delay, max_s)
        delay = min(delay * 2, max_s)


@dataclass
class Endpoint:
    url: str
    up: bool = True
    in_flight: int = 0
    turns: int = 0  # sent to it since start (the tie-break of the routing)
    model: str | None = None  # the served model name to request
    error: str | None = None  # why it is down
    probe: asyncio.Task[None] | None = None

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "url": self.url,
            "up": self.up,
            "in_flight": self.in_flight,
            "turns": self.turns,
        }
        if not self.up and self.error:
            info["error"] = self.error
        return info
