"""Run the real app under uvicorn on a free loopback port, in a thread, for client tests."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from voxtral_server.api.app import create_app
from voxtral_server.config import Settings
from voxtral_server.models.streamer import ChunkSink
from voxtral_server.models.types import Request, RequestHandle


class SharedEngine:
    """Lends a test-session engine to a server without letting its shutdown close it."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        handle: RequestHandle = self._engine.submit(request, sink)
        return handle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.loop = asyncio.get_running_loop()
        self.ready.set()


@contextmanager
def running_server(settings: Settings, engine: Any) -> Iterator[tuple[str, Any]]:
    """Yields (base http URL, the FastAPI app) while the server runs."""
    port = free_port()
    app = create_app(settings, engine_factory=lambda s: SharedEngine(engine))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, ws_max_size=16 * 1024 * 1024
    )
    server = _Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    if not server.ready.wait(30) or server.loop is None:
        raise RuntimeError("test server did not start")
    asyncio.run_coroutine_threadsafe(app.state.server.wait_loaded(), server.loop).result(60)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
