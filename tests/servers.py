"""Run the real app under uvicorn on a free loopback port, in a thread, for client tests."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from voxtral_server.api.app import create_app
from voxtral_server.api.inprocess import InProcessServer, free_port
from voxtral_server.config import Settings
from voxtral_server.models.chunking import ChunkSink
from voxtral_server.models.types import Request, RequestHandle

__all__ = ["InProcessServer", "SharedEngine", "free_port", "idle", "on_server", "running_server"]

T = TypeVar("T")


class SharedEngine:
    """Lends a test-session engine to a server without letting its shutdown close it."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        handle: RequestHandle = self._engine.submit(request, sink)
        return handle

    def promote(self, handle: RequestHandle) -> None:
        self._engine.promote(handle)

    @property
    def ready(self) -> bool:
        return bool(self._engine.ready)

    @property
    def queue_depth(self) -> int:
        return int(self._engine.queue_depth)

    def describe(self) -> dict[str, Any]:
        return dict(self._engine.describe())

    def close(self, timeout: float = 30.0) -> None:
        """The test session closes the engine it lent, not the server."""


@contextmanager
def running_server(settings: Settings, engine: Any, **config: Any) -> Iterator[tuple[str, Any]]:
    """Yields (base URL, the FastAPI app) while the server runs. `config` goes to uvicorn
    (`**SelfSigned.uvicorn()` from tests/tls.py for TLS: the URL then says https)."""
    app = create_app(settings, engine_factory=lambda s: SharedEngine(engine))
    with InProcessServer(app, **config) as server:
        yield server.base_url, app


def on_server(app: Any, coro: Coroutine[Any, Any, T], within_s: float = 30) -> T:
    """Run `coro` on the server's own event loop and wait for its result."""
    loop = app.state.server_loop
    return asyncio.run_coroutine_threadsafe(coro, loop).result(within_s)


async def idle(app: Any) -> dict[str, int]:
    """(On the server loop.) Wait until the server holds no session or call; count its tasks."""
    await app.state.server.idle.wait()
    assert not app.state.server.peers.calls
    current = asyncio.current_task()
    return {"tasks": len([t for t in asyncio.all_tasks() if t is not current])}
