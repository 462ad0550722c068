"""aiortc's own fire-and-forget tasks: what fails in one is logged as a peer gone, once.

aiortc starts some tasks without keeping them (`asyncio.ensure_future` in its SCTP
transport: a T3 retransmission, a data channel flush). When a peer dies without closing
(killed, network gone), its ICE consent expires a few seconds later; a retransmission that
fires between that and the call's close fails with ConnectionError ("Cannot send data, not
connected") in such a task. Nobody can await it, so asyncio logged "Task exception was
never retrieved" with a traceback at ERROR, which reads like a server fault. `install`
puts a handler on the server's loop that logs exactly those as one INFO line; every other
context still goes to the handler that was there before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

Handler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


def aiortc_task_lost_its_peer(context: dict[str, Any]) -> str | None:
    """The aiortc coroutine's name when `context` is one of its orphan tasks that failed
    because the connection under it is gone; None for anything else."""
    task = context.get("future")
    if not isinstance(task, asyncio.Task) or not isinstance(
        context.get("exception"), ConnectionError
    ):
        return None
    code = getattr(task.get_coro(), "cr_code", None)
    if code is None or "/aiortc/" not in code.co_filename.replace("\\", "/"):
        return None
    return str(code.co_qualname)


def install(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Handle aiortc's orphan task failures on `loop`; returns what puts the previous
    handler back."""
    previous: Handler | None = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        name = aiortc_task_lost_its_peer(context)
        if name is not None:
            logger.info(
                "aiortc %s failed after its peer went away: %s",
                name,
                context["exception"],
            )
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
    return lambda: loop.set_exception_handler(previous)
