"""The /v1/realtime WebSocket transport: JSON text frames both ways, audio as base64 PCM16."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketDisconnected, WebSocketState

from .. import protocol as p
from ..security import bearer_token, origin_allowed, subprotocol_token, token_matches
from ..session import Session
from ..speech import WebSocketAudioOut
from ..state import EngineNotReady, ServerState, TooManySessions
from .activity import IDLE_CODE, IdleTimer

logger = logging.getLogger(__name__)
router = APIRouter()

_OUTBOX = 1024  # events queued for a slow client before it is disconnected
_FLUSH_S = 2.0  # how long a closing connection waits for its last events to be written


def presented_token(ws: WebSocket) -> str | None:
    return bearer_token(ws.headers) or subprotocol_token(ws.scope.get("subprotocols", []))


class WebSocketTransport:
    name = "websocket"

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self._outbox: asyncio.Queue[str] = asyncio.Queue(_OUTBOX)
        self.too_slow = asyncio.Event()

    def send(self, event: p.ServerEvent) -> None:
        try:
            self._outbox.put_nowait(event.to_json())
        except asyncio.QueueFull:
            self.too_slow.set()

    async def write_loop(self) -> None:
        """Write queued events until the client goes away (an ordinary end: returns)."""
        while True:
            text = await self._outbox.get()
            try:
                await self.ws.send_text(text)
            except (WebSocketDisconnect, WebSocketDisconnected, OSError) as exc:
                # uvicorn's ClientDisconnected is an OSError: the client closed its socket.
                logger.info("websocket client gone while sending (%s)", type(exc).__name__)
                return
            self._outbox.task_done()

    async def flush(self) -> None:
        """Until every queued event is written (the write loop must be running)."""
        await self._outbox.join()


async def _refuse(ws: WebSocket, code: str, message: str, close_code: int) -> None:
    """Accept only to say why (browsers cannot read a refused handshake), then close."""
    await ws.accept(subprotocol=_subprotocol(ws))
    await ws.send_text(p.error_event(code, message).to_json())
    await ws.close(close_code, message[:120])
    state: ServerState = ws.app.state.server
    state.metrics.error("-", code, f"websocket refused: {message}")


def _subprotocol(ws: WebSocket) -> str | None:
    return "realtime" if "realtime" in ws.scope.get("subprotocols", []) else None


@router.websocket("/v1/realtime")
async def realtime_websocket(ws: WebSocket) -> None:
    state: ServerState = ws.app.state.server
    settings = state.settings
    if not origin_allowed(ws.headers, settings):
        origin = ws.headers.get("origin")
        await _refuse(ws, "forbidden_origin", f"origin {origin} is not allowed", 1008)
        return
    if not token_matches(presented_token(ws), settings):
        await _refuse(ws, "unauthorized", "missing or wrong auth token", 1008)
        return
    transport = WebSocketTransport(ws)
    client = ws.client.host if ws.client is not None else None
    try:
        session = state.open_session(transport, client)
    except EngineNotReady as exc:
        await _refuse(ws, "not_ready", str(exc), 1013)
        return
    except TooManySessions as exc:  # or TooManySessionsFromClient: its own code
        await _refuse(ws, exc.code, str(exc), 1013)
        return
    audio_out = None
    if state.tts is not None:
        audio_out = WebSocketAudioOut(transport.send, lambda: session.config.output_format)
        session.audio_out = audio_out
    await ws.accept(subprotocol=_subprotocol(ws))
    writer = asyncio.create_task(transport.write_loop(), name=f"ws-writer-{session.id}")
    slow = asyncio.create_task(transport.too_slow.wait(), name=f"ws-slow-{session.id}")
    activity = IdleTimer(settings.server.idle_timeout_s)
    idle = asyncio.create_task(activity.expired(), name=f"ws-idle-{session.id}")
    reader: asyncio.Task[None] | None = None
    close_code, close_reason = 1000, ""
    try:
        await session.start()  # session.created goes out before any client event is handled
        reader = asyncio.create_task(
            _read_loop(ws, session, activity), name=f"ws-reader-{session.id}"
        )
        done, _ = await asyncio.wait(
            {writer, reader, slow, idle}, return_when=asyncio.FIRST_COMPLETED
        )
        if slow in done:
            logger.warning("session=%s client too slow: %d events queued", session.id, _OUTBOX)
        if idle in done and writer not in done:
            logger.info("session=%s idle for %g s: closing", session.id, activity.timeout_s)
            transport.send(activity.event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(transport.flush(), _FLUSH_S)
            close_code, close_reason = 1000, IDLE_CODE
        for task in done:  # a task that died must say why, not just close the connection
            if not task.cancelled() and task.exception() is not None:
                logger.error(
                    "session=%s task %s failed: closing the connection",
                    session.id,
                    task.get_name(),
                    exc_info=task.exception(),
                )
    finally:
        tasks = [t for t in (writer, reader, slow, idle) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if audio_out is not None:
            await audio_out.close()
        await state.close_session(session)  # last: the server is idle once it returns
        if ws.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(close_code, close_reason)


async def _read_loop(ws: WebSocket, session: Session, activity: IdleTimer) -> None:
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            activity.touch()  # any frame from the client, even one it gets an error for
            if message.get("text") is not None:
                await session.handle_text(message["text"])
            elif message.get("bytes") is not None:
                session.transport.send(
                    p.error_event(
                        "binary_not_supported",
                        "send events as JSON text frames; audio goes in input_audio_buffer.append",
                    )
                )
    except WebSocketDisconnect:
        return
