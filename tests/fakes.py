"""A transport that records what a client would receive, and waits for it without sleeping."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from voxtral_server.api import protocol as p
from voxtral_server.models.audio import SAMPLE_RATE
from voxtral_server.models.chunking import ChunkSink
from voxtral_server.models.types import Request, RequestHandle


class FakeTransport:
    name = "fake"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def send(self, event: p.ServerEvent) -> None:
        # What a client would receive: the JSON text, read back (so an event that cannot be
        # serialised fails the test that sent it).
        self.events.append(json.loads(event.to_json().encode("utf-8")))
        self._changed.set()

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]

    async def wait_for(self, type_: str, count: int = 1, within_s: float = 60) -> dict[str, Any]:
        async def until() -> dict[str, Any]:
            while len(self.of(type_)) < count:
                self._changed.clear()
                await self._changed.wait()
            return self.of(type_)[count - 1]

        return await asyncio.wait_for(until(), within_s)


def frames(audio: np.ndarray, ms: int = 20) -> list[np.ndarray]:
    step = SAMPLE_RATE * ms // 1000
    return [audio[i : i + step] for i in range(0, audio.size, step)]


class StubEngine:
    """The whole `Engine` contract, answering nothing: subclass it and override what a test
    needs (a server only calls submit for turns)."""

    ready = True
    queue_depth = 0

    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        raise AssertionError("not used")

    def promote(self, handle: RequestHandle) -> None:
        handle.speculative = False

    def describe(self) -> dict[str, Any]:
        return {"engine": "stub"}

    def close(self, timeout: float = 30.0) -> None:
        pass
