"""WebRTC transport (aiortc): POST /v1/realtime/calls with an SDP offer returns the answer.

Audio arrives on the track (Opus, put back in order waiting for at most
`webrtc.jitter_window` packets, decoded on the event loop to 16 kHz mono by `audio_in`);
events go both ways on the data channel named `oai-events`. One `PeerManager` owns every
peer connection and its tasks, closes a connection that is not connected within
`webrtc.connect_timeout_s`, and closes them all on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
)
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from .. import protocol as p
from ..metrics import quoted
from ..security import bearer_token, ice_servers, origin_allowed, token_matches
from ..session import Session
from ..state import EngineNotReady, ServerState, TooManySessions
from .activity import IdleTimer
from .audio_in import DirectDecoder, receive_audio
from .audio_track import SpeechTrack

logger = logging.getLogger(__name__)
router = APIRouter()

EVENTS_CHANNEL = "oai-events"
MAX_SDP_BYTES = 64 * 1024
DRAIN_BYTES = 2 * 1024 * 1024  # read and dropped past the limit, so the 413 can be read
FLUSH_S = 2.0  # how long a closing call waits for its last events to leave


class TooManyPendingCalls(RuntimeError):
    """webrtc.max_pending_calls calls are still connecting."""


class DataChannelTransport:
    """Sends on the data channel once it is open; events before that wait in order."""

    name = "webrtc"

    def __init__(self) -> None:
        self.channel: RTCDataChannel | None = None
        self._early: list[str] = []

    def attach(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        early, self._early = self._early, []
        for text in early:
            channel.send(text)

    def send(self, event: p.ServerEvent) -> None:
        text = event.to_json()
        channel = self.channel
        if channel is None:
            self._early.append(text)
        elif channel.readyState == "open":
            channel.send(text)

    async def flush(self) -> None:
        """Until what was sent has been handed to the connection (bounded by the caller)."""
        channel = self.channel
        if channel is None or channel.readyState != "open" or channel.bufferedAmount == 0:
            return
        low = asyncio.Event()
        channel.once("bufferedamountlow", low.set)
        await low.wait()


class Call:
    """One peer connection, its session and its tasks."""

    def __init__(self, manager: PeerManager, pc: RTCPeerConnection, session: Session) -> None:
        self.id = p.new_id("call")
        self.manager = manager
        self.pc = pc
        self.session = session
        self.transport: DataChannelTransport = session.transport  # type: ignore[assignment]
        self.tasks: set[asyncio.Task[Any]] = set()
        self.connected = asyncio.Event()
        self.channel_open = asyncio.Event()
        self.closed = False
        # Data channel messages, handled one at a time in arrival order (handling one may
        # await, e.g. loading the VAD model; a task per message could reorder them).
        self.inbox: asyncio.Queue[str | bytes] = asyncio.Queue(1024)
        self.speech_track: SpeechTrack | None = None
        self.audio_in: DirectDecoder | None = None
        self.activity = IdleTimer(manager.state.settings.server.idle_timeout_s)

    def spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"{name}-{self.id}")
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self.closed:
            # A dead audio or event task would leave the client talking to nobody.
            logger.error(
                "session=%s call=%s task %s failed: closing the call",
                self.session.id,
                self.id,
                task.get_name(),
                exc_info=task.exception(),
            )
            self.spawn(self.close(), "close")

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.session.close()  # generation and speech stop now
        current = asyncio.current_task()
        tasks = [t for t in self.tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.speech_track is not None:
            self.speech_track.stop()
        await self.pc.close()
        await self.manager.forget(self)  # last: the server is idle once no call is left
        logger.info("session=%s call=%s closed", self.session.id, self.id)

    async def watchdog(self, limit_s: float) -> None:
        """Close a call that has not connected AND opened its events channel in time."""
        try:
            async with asyncio.timeout(limit_s):
                await self.connected.wait()
                await self.channel_open.wait()
        except TimeoutError:
            logger.warning(
                "session=%s call=%s not connected with an events channel after %.0f s: closing",
                self.session.id,
                self.id,
                limit_s,
            )
            await self.close()
            return
        self.manager.pending.discard(self)  # connected: no longer counts as pending

    async def watch_idle(self) -> None:
        """Close a call whose client has sent neither events nor audio for a while."""
        await self.activity.expired()
        logger.info(
            "session=%s call=%s idle for %g s: closing",
            self.session.id,
            self.id,
            self.activity.timeout_s,
        )
        self.transport.send(self.activity.event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.transport.flush(), FLUSH_S)
        self.spawn(self.close(), "close")  # not awaited here: close() cancels this task

    def listen(self, receiver: RTCRtpReceiver) -> None:
        """Take the microphone's audio from `receiver` (before the connection starts)."""
        window = self.manager.state.settings.webrtc.jitter_window
        self.audio_in = receive_audio(receiver, window, self.hear, self._audio_failed)

    def hear(self, pcm: np.ndarray, timestamp: int) -> None:
        """16 kHz mono audio from the microphone, on the event loop, in order."""
        self.activity.touch()
        try:
            self.session.append_audio(pcm, continuous=True)
        except p.ProtocolError as exc:
            self.session.transport.send(p.error_event(exc.code, str(exc)))

    def _audio_failed(self, exc: BaseException) -> None:
        if self.closed:
            return
        # Without its audio the call would go on with a deaf session.
        logger.error(
            "session=%s call=%s incoming audio failed: closing the call",
            self.session.id,
            self.id,
            exc_info=exc,
        )
        self.spawn(self.close(), "close")

    def receive(self, message: str | bytes) -> None:
        self.activity.touch()
        try:
            self.inbox.put_nowait(message)
        except asyncio.QueueFull:
            logger.warning("session=%s sends events faster than they are handled", self.session.id)
            self.spawn(self.close(), "close")

    async def read_events(self) -> None:
        while True:
            message = await self.inbox.get()
            if isinstance(message, bytes):
                self.transport.send(
                    p.error_event("binary_not_supported", "send events as JSON text messages")
                )
                continue
            await self.session.handle_text(message)


class PeerManager:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.calls: set[Call] = set()
        # Calls not yet connected with their events channel open: a smaller budget
        # (webrtc.max_pending_calls), so offers that never connect cannot hold every slot.
        self.pending: set[Call] = set()

    def _configuration(self) -> RTCConfiguration:
        # Always explicit: aiortc's default configuration uses a public STUN server.
        # TURN credentials minted from webrtc.turn_secret are fresh for each call.
        servers = [RTCIceServer(**s) for s in ice_servers(self.state.settings, time.time())]
        return RTCConfiguration(iceServers=servers)

    async def answer(self, offer_sdp: str, client: str | None = None) -> tuple[Call, str]:
        """The answer to an offer from address `client`. Raises TooManyPendingCalls,
        TooManySessions (or TooManySessionsFromClient) and EngineNotReady."""
        state = self.state
        limit = state.settings.webrtc.max_pending_calls
        if len(self.pending) >= limit:
            raise TooManyPendingCalls(
                f"webrtc.max_pending_calls = {limit} calls are still connecting; "
                "retry shortly or use the WebSocket"
            )
        session = state.open_session(DataChannelTransport(), client)
        pc = RTCPeerConnection(self._configuration())
        call = Call(self, pc, session)
        self.calls.add(call)
        self.pending.add(call)

        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != EVENTS_CHANNEL:
                logger.warning("session=%s ignores data channel %r", session.id, channel.label)
                return

            channel.on("message", call.receive)
            # Without its events channel the conversation cannot go on.
            channel.on("close", lambda: call.spawn(call.close(), "close"))

            def opened() -> None:
                call.transport.attach(channel)
                call.channel_open.set()

            if channel.readyState == "open":
                opened()
            else:
                channel.on("open", opened)

        async def on_state() -> None:
            logger.info("session=%s call=%s state=%s", session.id, call.id, pc.connectionState)
            if pc.connectionState == "connected":
                call.connected.set()
            elif pc.connectionState in ("failed", "closed"):
                call.spawn(call.close(), "close")

        pc.on("datachannel", on_datachannel)
        pc.on("connectionstatechange", on_state)

        try:
            await session.start()
            await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            for transceiver in pc.getTransceivers():
                if transceiver.kind == "audio":  # receivers start once connected
                    call.listen(transceiver.receiver)
            if state.tts is not None and any(
                # aiortc keeps what the offer lets us do as the private `_offerDirection`.
                t.kind == "audio" and getattr(t, "_offerDirection", "") in ("sendrecv", "sendonly")
                for t in pc.getTransceivers()
            ):
                # The offer can receive audio: speak on it (an offer without audio gets text).
                call.speech_track = SpeechTrack(call.transport.send)
                pc.addTrack(call.speech_track)
                session.audio_out = call.speech_track
            # Browsers leave end-of-candidates out of the SDP; without it ICE keeps waiting.
            await pc.addIceCandidate(None)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception:
            await call.close()
            raise
        call.spawn(call.watchdog(state.settings.webrtc.connect_timeout_s), "watchdog")
        call.spawn(call.read_events(), "events-in")
        call.spawn(call.watch_idle(), "idle")
        return call, pc.localDescription.sdp

    async def forget(self, call: Call) -> None:
        self.calls.discard(call)
        self.pending.discard(call)
        await self.state.close_session(call.session)

    async def close(self) -> None:
        await asyncio.gather(*(call.close() for call in list(self.calls)), return_exceptions=True)


def _problem(status: int, code: str, message: str, close: bool = False) -> Response:
    logger.warning("webrtc offer refused status=%d code=%s: %s", status, code, quoted(message))
    headers = {"connection": "close"} if close else None
    return PlainTextResponse(f"{code}: {message}\n", status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, counted as it arrives: None once it passes `limit` (nothing more is kept).

    What the client still sends past the limit is read and dropped, up to DRAIN_BYTES, so
    it gets a readable 413 instead of a connection reset; past that the connection closes.
    """
    body = bytearray()
    seen = 0
    async for piece in request.stream():
        seen += len(piece)
        if seen <= limit:
            body += piece
        elif seen > limit + DRAIN_BYTES:
            break
    return bytes(body) if seen <= limit else None


async def _multipart_offer(request: Request) -> tuple[bytes, str | None] | Response:
    """The offer (`sdp`) and the session settings (`session`, JSON) of a multipart call
    request, the latter checked as a session.update; or the error response."""
    try:
        form = await request.form(max_files=2, max_fields=2, max_part_size=MAX_SDP_BYTES)
    except Exception as exc:  # starlette's MultiPartException, malformed bodies
        return _problem(400, "invalid_request", f"cannot read the multipart body: {exc}")
    parts: dict[str, bytes] = {}
    for name in ("sdp", "session"):
        value = form.get(name)
        if value is None:
            continue
        data = value.encode("utf-8") if isinstance(value, str) else await value.read(
            MAX_SDP_BYTES + 1
        )  # fmt: skip
        if len(data) > MAX_SDP_BYTES:
            return _problem(413, "offer_too_large", f"`{name}` part over {MAX_SDP_BYTES} bytes")
        parts[name] = data
    await form.close()
    if "sdp" not in parts:
        return _problem(400, "invalid_sdp", "the multipart body has no `sdp` part")
    if "session" not in parts:
        return parts["sdp"], None
    try:
        config = json.loads(parts["session"])
        update = json.dumps({"type": "session.update", "session": config})
        p.parse_client_event(update)
    except ValueError as exc:  # not JSON, or a ProtocolError naming the field
        return _problem(400, "invalid_session", f"the `session` part: {exc}")
    return parts["sdp"], update


@router.post("/v1/realtime/calls")
async def create_call(request: Request) -> Response:
    state: ServerState = request.app.state.server
    peers: PeerManager = request.app.state.peers
    if not state.settings.webrtc.enabled:
        return _problem(
            404, "webrtc_disabled", "WebRTC is disabled (webrtc.enabled); use the WebSocket"
        )
    if not origin_allowed(request.headers, state.settings):
        origin = request.headers.get("origin")
        return _problem(403, "forbidden_origin", f"origin {origin} is not allowed")
    if not token_matches(bearer_token(request.headers), state.settings):
        return _problem(401, "unauthorized", "missing or wrong auth token")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    update: str | None = None  # the multipart form's `session`, as a session.update
    if content_type == "multipart/form-data":  # OpenAI's SDK: `sdp` and `session` parts
        parts = await _multipart_offer(request)
        if isinstance(parts, Response):
            return parts
        body, update = parts
    elif content_type == "application/sdp":
        read = await _read_body(request, MAX_SDP_BYTES)
        if read is None:
            return _problem(
                413, "offer_too_large", f"SDP offer over {MAX_SDP_BYTES} bytes", close=True
            )
        body = read
    else:
        return _problem(
            415,
            "unsupported_media_type",
            "expected application/sdp, or multipart/form-data with an `sdp` part (and a "
            f"`session` part), got {content_type or 'nothing'}",
        )
    try:
        sdp = body.decode("utf-8")
    except UnicodeDecodeError:
        return _problem(400, "invalid_sdp", "the offer is not UTF-8 text")
    if not sdp.startswith("v=0") or "m=" not in sdp:
        return _problem(400, "invalid_sdp", "the body is not an SDP offer (no v=0 / m= lines)")
    if "a=fingerprint:" not in sdp:
        return _problem(400, "invalid_sdp", "the offer has no DTLS fingerprint (a=fingerprint)")
    client = request.client.host if request.client is not None else None
    try:
        call, answer = await peers.answer(sdp, client)
    except EngineNotReady as exc:
        return _problem(503, "not_ready", str(exc))
    except TooManySessions as exc:  # or TooManySessionsFromClient: its own code
        return _problem(503, exc.code, str(exc))
    except TooManyPendingCalls as exc:
        return _problem(503, "too_many_pending_calls", str(exc))
    except Exception as exc:  # aiortc's parse and negotiation errors
        detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return _problem(400, "invalid_sdp", f"cannot negotiate this offer ({detail})")
    if update is not None:  # checked above: session.updated follows session.created
        await call.session.handle_text(update)
    logger.info("session=%s call=%s answered", call.session.id, call.id)
    return Response(
        content=answer,
        status_code=201,
        media_type="application/sdp",
        headers={"Location": f"/v1/realtime/calls/{call.id}"},
    )
