"""When a client last sent something, for `server.idle_timeout_s` (shared by both transports).

The transport notes every client event and every audio frame (`touch`); a task per
connection awaits `expired()` and then closes the conversation with an `idle_timeout` error.
The session core knows nothing of it: a quiet client is a transport matter.
"""

from __future__ import annotations

import asyncio

from .. import protocol as p

IDLE_CODE = "idle_timeout"


class IdleTimer:
    """`expired()` returns once the client has sent nothing for `timeout_s` seconds."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s or None  # 0 or None: never
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()

    def touch(self) -> None:
        """The client sent an event or audio just now."""
        self._last = self._loop.time()

    async def expired(self) -> None:
        if self.timeout_s is None:
            await asyncio.Future()  # never; cancelled with the connection
        assert self.timeout_s is not None
        while True:
            # One timer per deadline, re-armed only when activity moved it: no polling.
            left = self._last + self.timeout_s - self._loop.time()
            if left <= 0:
                return
            await asyncio.sleep(left)

    def event(self) -> p.ServerEvent:
        """The error event that says why the server closes this conversation."""
        return p.error_event(
            IDLE_CODE,
            f"no client event or audio for {self.timeout_s:g} s "
            "(server.idle_timeout_s): closing the conversation",
        )
