"""The app under uvicorn in a background thread of this process.

For tests and benchmarks that drive the real server from the same process, and for programs
that embed it. `with InProcessServer(create_app(settings)) as server:` returns once the
server answers HTTP and its model has loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class _Uvicorn(uvicorn.Server):
    """uvicorn that says when it serves, and on which event loop."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.serving = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.loop = asyncio.get_running_loop()
        self.serving.set()


class InProcessServer:
    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None, **config: Any
    ) -> None:
        self.app = app
        self.host = host
        # uvicorn's ssl_certfile / ssl_keyfile (api/tls.py's tls_options) make it https.
        self.scheme = "https" if config.get("ssl_certfile") else "http"
        self.port = port or free_port(host)
        config.setdefault("log_config", None)
        config.setdefault("ws_max_size", 16 * 1024 * 1024)
        config.setdefault("ws_per_message_deflate", False)  # as `serve` (http_limits)
        self._server = _Uvicorn(uvicorn.Config(app, host=host, port=self.port, **config))
        self._thread = threading.Thread(
            target=self._server.run, name=f"uvicorn-{self.port}", daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def realtime_url(self) -> str:
        """The WebSocket endpoint: ws://, or wss:// when serving TLS."""
        return f"{self.scheme.replace('http', 'ws', 1)}://{self.host}:{self.port}/v1/realtime"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop (its objects live there)."""
        assert self._server.loop is not None, "start() the server first"
        return self._server.loop

    @property
    def state(self) -> Any:
        """The app's ServerState (sessions, peers, metrics, engine)."""
        return self.app.state.server

    def run(self, coro: Coroutine[Any, Any, T], within_s: float = 60) -> T:
        """Run a coroutine on the server's event loop and return its result."""
        assert self._server.loop is not None, "start() the server first"
        return asyncio.run_coroutine_threadsafe(coro, self._server.loop).result(within_s)

    def start(self, wait_loaded: bool = True, load_within_s: float = 1800) -> InProcessServer:
        self._thread.start()
        if not self._server.serving.wait(60) or self._server.loop is None:
            self.stop()
            raise RuntimeError("the server did not start within 60 s")
        if wait_loaded:
            self.run(self.state.wait_loaded(), load_within_s)
            if self.state.engine is None:
                self.stop()
                raise RuntimeError(f"the model failed to load: {self.state.load_error}")
        return self

    def stop(self, within_s: float = 60) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(within_s)
        if self._thread.is_alive():
            raise RuntimeError(f"the server thread did not stop within {within_s:g} s")

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
