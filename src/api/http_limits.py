"""uvicorn's connection-level limits, set deliberately (used by `voxtral-server serve` and by
tests that run the server in-process).

uvicorn bounds a connection that is idle *between* requests (`timeout_keep_alive`) but not
one that opens and never completes a request: a client that sends half a request line, or
nothing at all, holds its socket until it goes away itself. `HeaderTimeoutProtocol` closes a
connection whose request headers are not complete `server.request_header_timeout_s` after
it opened (or after the first byte of a later request on a kept-alive connection).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..config import Settings

logger = logging.getLogger(__name__)

KEEP_ALIVE_S = 5  # idle between two requests on one connection (uvicorn's own default)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a deadline for each request's headers."""

    header_timeout_s: float = 10.0  # set per server by `uvicorn_options`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is bounded too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._disarm()  # a complete request: the app (or the WebSocket) owns it from here
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expired(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            logger.info(
                "closing a connection from %s: no complete request within %g s "
                "(server.request_header_timeout_s)",
                f"{self.client[0]}:{self.client[1]}" if self.client else "?",
                self.header_timeout_s,
            )
            self.transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config`/`uvicorn.run` that bound what a connection holds."""
    protocol = type(
        "HeaderTimeoutProtocol",
        (HeaderTimeoutProtocol,),
        {"header_timeout_s": settings.server.request_header_timeout_s},
    )
    return {
        "http": protocol,
        "timeout_keep_alive": KEEP_ALIVE_S,
        # Not limit_concurrency: it counts open WebSockets too and answers 503 to everyone
        # alike, the page included; server.max_sessions(_per_client) and the header
        # deadline above bound what one client can hold instead.
        "ws_max_size": max(4 * settings.server.max_event_bytes, 16 * 1024 * 1024),
        "ws_ping_interval": 20,
        # No permessage-deflate: base64 audio barely compresses (~75%), and inflating a
        # client's 1 MiB append took ~6 ms of the event loop every session shares.
        "ws_per_message_deflate": False,
    }
