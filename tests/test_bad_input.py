"""Bad input on both transports: each gets a clear error, and a good turn succeeds afterwards.

Four kinds of server, each started once per module (or per test) and stopped by its context
manager:

- `main`: small limits (`server.max_event_bytes` = 8 KiB, `audio.max_utterance_s` = 5) for the
  WebSocket protocol table, WebRTC signalling, Origin checks and a WebRTC turn with a wav track;
- `token_server`: `server.auth_token` set (WebSocket and WebRTC authentication);
- `single_server`: `server.max_sessions` = 1 (too many sessions, on both transports);
- a throwaway server for an offer that leaves a call behind.

Every WebSocket case checks the `error` event a client receives (code, a message naming the
problem, the client's `event_id` when it sent one), then does a push-to-talk turn on the same
connection whose words must be the scripted answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from conftest import SAMPLE_WAV, SCRIPT
from fakes import FakeTransport
from servers import running_server
from wire import PUSH_TO_TALK, appends, pcm16_b64

from voxtral_server.api import protocol as p
from voxtral_server.api.session import Session
from voxtral_server.config import Settings
from voxtral_server.models.audio import read_audio_file
from voxtral_server.models.chunking import ChunkSink
from voxtral_server.models.types import Chunk, Request, RequestHandle
from voxtral_server.models.voxtral import VoxtralEngine

SPEECH = read_audio_file(SAMPLE_WAV)  # 4 s: speech, then silence
CHUNK_MS = 40  # audio per append, as a real-time client sends it
WAIT_S = 60  # upper bound of any single wait; nothing here sleeps
MAX_EVENT_BYTES = 8192
MAX_UTTERANCE_S = 5.0
TOKEN = "bad-input-test-token-0123456789"
WRONG_TOKEN = "not-the-token-0123456789abcdef"


# ------------------------------------------------------------------ event helpers


def event(type_: str, **fields: Any) -> str:
    return json.dumps({"type": type_, **fields})


def deltas(seen: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta")


def check_error(
    event_: dict[str, Any], code: str, fragments: tuple[str, ...], event_id: str | None = None
) -> dict[str, Any]:
    assert event_["type"] == "error", event_
    error: dict[str, Any] = event_["error"]
    assert error["code"] == code, error
    assert error["type"] == "invalid_request_error", error
    for fragment in fragments:
        assert fragment in error["message"], error
    if event_id is not None:
        assert error.get("event_id") == event_id, error
    return error


# ------------------------------------------------------------------ WebSocket client


def ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://", 1) + "/v1/realtime"


async def next_event(ws: Any) -> dict[str, Any]:
    event_: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
    return event_


async def recv_until(ws: Any, type_: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Collect events into `seen` until one of `type_`; an unexpected error fails at once."""
    while True:
        event_ = await next_event(ws)
        seen.append(event_)
        if event_["type"] == type_:
            return event_
        assert event_["type"] != "error", f"unexpected error while waiting for {type_}: {event_}"


async def expect_error(
    ws: Any, code: str, *fragments: str, event_id: str | None = None
) -> dict[str, Any]:
    """The very next event is an error with this code and a message naming the problem."""
    return check_error(await next_event(ws), code, fragments, event_id)


@asynccontextmanager
async def ws_session(url: str, **connect: Any) -> AsyncIterator[Any]:
    """An open WebSocket whose session.created has arrived."""
    async with websockets.connect(url, **connect) as ws:
        await recv_until(ws, "session.created", [])
        yield ws


async def good_turn(ws: Any) -> dict[str, Any]:
    """Push-to-talk on an open connection: the scripted answer, complete and error-free."""
    seen: list[dict[str, Any]] = []
    await ws.send(PUSH_TO_TALK)
    await recv_until(ws, "session.updated", seen)
    for message in appends(SPEECH):
        await ws.send(message)
    await ws.send(event("input_audio_buffer.commit"))
    await recv_until(ws, "input_audio_buffer.committed", seen)
    await ws.send(event("response.create"))
    done = await recv_until(ws, "response.done", seen)
    assert deltas(seen) == SCRIPT
    assert done["response"]["status"] == "completed"
    return done


async def expect_refused(
    url: str, code: str, close_code: int, *fragments: str, **connect: Any
) -> None:
    """The server accepts only to send one error event, then closes with `close_code`."""
    async with websockets.connect(url, **connect) as ws:
        await expect_error(ws, code, *fragments)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WAIT_S)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == close_code


# ------------------------------------------------------------------ WebRTC client


async def post_offer(
    base_url: str,
    body: str | bytes,
    content_type: str | None = "application/sdp",
    token: str | None = None,
) -> httpx.Response:
    headers = {}
    if content_type is not None:
        headers["content-type"] = content_type
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        return await http.post(f"{base_url}/v1/realtime/calls", content=body, headers=headers)


def check_problem(reply: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.text.startswith(f"{code}: "), reply.text
    for fragment in fragments:
        assert fragment in reply.text, reply.text


class RtcClient:
    """A browser stand-in: the wav as its microphone track, events on `oai-events`."""

    def __init__(self, wav: Path | None = SAMPLE_WAV) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("oai-events")
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.channel.on("message", self._on_message)
        self.player = MediaPlayer(str(wav)) if wav is not None else None
        if self.player is not None:
            self.pc.addTrack(self.player.audio)

    def _on_message(self, message: str) -> None:
        self.events.append(json.loads(message))
        self._changed.set()

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp: str = self.pc.localDescription.sdp
        return sdp

    async def connect(self, base_url: str, token: str | None = None) -> None:
        reply = await post_offer(base_url, await self.offer(), token=token)
        assert reply.status_code == 201, reply.text
        assert reply.headers["content-type"].startswith("application/sdp")
        await self.pc.setRemoteDescription(RTCSessionDescription(reply.text, "answer"))

    async def wait_for(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async def until() -> dict[str, Any]:
            while True:
                for event_ in self.events:
                    if match(event_):
                        return event_
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(until(), WAIT_S)

    async def wait_type(self, type_: str) -> dict[str, Any]:
        return await self.wait_for(lambda e: e["type"] == type_)

    async def wait_error(self, code: str, *fragments: str) -> dict[str, Any]:
        found = await self.wait_for(lambda e: e["type"] == "error" and e["error"]["code"] == code)
        return check_error(found, code, fragments)

    async def answered_turn(self) -> None:
        """The track's speech was heard (server VAD) and answered with the script."""
        done = await self.wait_type("response.done")
        assert deltas(self.events) == SCRIPT
        assert done["response"]["status"] == "completed"
        assert done["timings"]["transport"] == "webrtc"

    async def close(self) -> None:
        if self.player is not None and self.player.audio is not None:
            self.player.audio.stop()
        await self.pc.close()


@asynccontextmanager
async def rtc_call(base_url: str, token: str | None = None) -> AsyncIterator[RtcClient]:
    client = RtcClient()
    try:
        await client.connect(base_url, token)
        await client.wait_type("session.created")
        yield client
    finally:
        await client.close()


async def real_offer() -> str:
    """A genuine aiortc offer (data channel + audio), its peer closed at once."""
    client = RtcClient()
    try:
        return await client.offer()
    finally:
        await client.close()


# ------------------------------------------------------------------ server helpers


class HeldFinal:
    """Holds a response's final chunk until `release()`: the response stays active meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sink: ChunkSink | None = None
        self._final: Chunk | None = None
        self._released = False

    def wrap(self, sink: ChunkSink) -> ChunkSink:
        self._sink = sink

        def deliver(chunk: Chunk) -> None:  # on the engine's worker thread
            if chunk.is_final:
                with self._lock:
                    if not self._released:
                        self._final = chunk
                        return
            sink(chunk)

        return deliver

    def release(self) -> None:
        with self._lock:
            self._released = True
            final, self._final = self._final, None
        if final is not None and self._sink is not None:
            self._sink(final)  # thread-safe: the session's sink hops onto its own loop


class HoldingEngine:
    """The scripted engine; `hold_next_final()` keeps the next response running on demand."""

    def __init__(self, engine: VoxtralEngine) -> None:
        self._engine = engine
        self._armed: HeldFinal | None = None

    def hold_next_final(self) -> HeldFinal:
        self._armed = HeldFinal()
        return self._armed

    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        held, self._armed = self._armed, None
        handle: RequestHandle = self._engine.submit(request, held.wrap(sink) if held else sink)
        return handle

    def promote(self, handle: RequestHandle) -> None:
        self._engine.promote(handle)


async def wait_idle(app: Any) -> None:
    """Until the server holds no session (and so no call) at all."""
    state = app.state.server
    future = asyncio.run_coroutine_threadsafe(state.idle.wait(), app.state.server_loop)
    await asyncio.wait_for(asyncio.wrap_future(future), WAIT_S)
    assert not state.peers.calls


def settings(**sections: dict[str, Any]) -> Settings:
    return Settings.model_validate(sections)


@dataclass(frozen=True)
class Running:
    base_url: str
    app: Any
    engine: HoldingEngine

    @property
    def ws(self) -> str:
        return ws_url(self.base_url)

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def main(scripted_engine: VoxtralEngine) -> Iterator[Running]:
    engine = HoldingEngine(scripted_engine)
    limits = settings(
        server={"max_event_bytes": MAX_EVENT_BYTES}, audio={"max_utterance_s": MAX_UTTERANCE_S}
    )
    with running_server(limits, engine) as (url, app):
        yield Running(url, app, engine)


@pytest.fixture(scope="module")
def token_server(scripted_engine: VoxtralEngine) -> Iterator[Running]:
    engine = HoldingEngine(scripted_engine)
    with running_server(settings(server={"auth_token": TOKEN}), engine) as (url, app):
        yield Running(url, app, engine)


@pytest.fixture(scope="module")
def single_server(scripted_engine: VoxtralEngine) -> Iterator[Running]:
    engine = HoldingEngine(scripted_engine)
    with running_server(settings(server={"max_sessions": 1}), engine) as (url, app):
        yield Running(url, app, engine)


# ------------------------------------------------------------------ WebSocket: protocol table


@dataclass(frozen=True)
class WsCase:
    frames: tuple[str | bytes, ...]
    code: str
    fragments: tuple[str, ...]
    event_id: str | None = None


WS_CASES = {
    "non_json_text": WsCase(("{this is not json",), "invalid_json", ("not valid JSON",)),
    "json_array": WsCase(("[1, 2, 3]",), "invalid_event", ("must be a JSON object",)),
    "json_string": WsCase(('"response.create"',), "invalid_event", ("must be a JSON object",)),
    "event_without_type": WsCase(
        ('{"event_id": "evt_bad"}',), "invalid_event", ("no string 'type'",), "evt_bad"
    ),
    "type_not_a_string": WsCase(
        ('{"type": 7, "event_id": "evt_bad"}',), "invalid_event", ("no string 'type'",), "evt_bad"
    ),
    "unknown_event_type": WsCase(
        (event("transcription_session.update", event_id="evt_bad"),),
        "unknown_event",
        ("'transcription_session.update'", "supported: session.update"),
        "evt_bad",
    ),
    "session_type_banana": WsCase(
        (event("session.update", event_id="evt_bad", session={"type": "banana"}),),
        "invalid_event",
        ("invalid session.update", "session.type", "'realtime' or 'transcription'"),
        "evt_bad",
    ),
    "session_update_without_session": WsCase(
        (event("session.update"),), "invalid_event", ("session: Field required",)
    ),
    "nan_vad_threshold": WsCase(
        (
            '{"type": "session.update", "session": {"audio": {"input": '
            '{"turn_detection": {"threshold": NaN}}}}}',
        ),
        "invalid_event",
        ("session.audio.input.turn_detection.threshold",),
    ),
    "language_not_iso_639_1": WsCase(
        (
            event(
                "session.update",
                session={"audio": {"input": {"transcription": {"language": "english"}}}},
            ),
        ),
        "invalid_event",
        ("transcription.language", "pattern"),
    ),
    "append_without_audio": WsCase(
        (event("input_audio_buffer.append"),), "invalid_event", ("audio: Field required",)
    ),
    "append_audio_not_a_string": WsCase(
        (event("input_audio_buffer.append", audio=12345),),
        "invalid_event",
        ("audio: Input should be a valid string",),
    ),
    "bad_base64": WsCase(
        (event("input_audio_buffer.append", event_id="evt_bad", audio="***not base64***"),),
        "invalid_audio",
        ("not valid base64",),
        "evt_bad",
    ),
    "odd_length_pcm": WsCase(
        (event("input_audio_buffer.append", audio=base64.b64encode(b"\x01\x02\x03").decode()),),
        "invalid_audio",
        ("even number of bytes", "got 3"),
    ),
    "oversize_event": WsCase(
        (event("input_audio_buffer.append", audio=pcm16_b64(np.zeros(4000, np.float32))),),
        "event_too_large",
        ("exceeds server.max_event_bytes = 8192",),
    ),
    "binary_frame": WsCase((b"\x00\x01binary\xff",), "binary_not_supported", ("JSON text frames",)),
    "commit_on_empty_buffer": WsCase(
        (event("input_audio_buffer.commit", event_id="evt_bad"),),
        "input_audio_buffer_commit_empty",
        ("buffer too small", "have 0 ms"),
        "evt_bad",
    ),
    "commit_under_100_ms": WsCase(
        (
            # 50 ms at 24 kHz: the format of a session that declared none
            event("input_audio_buffer.append", audio=pcm16_b64(np.zeros(1200, np.float32))),
            event("input_audio_buffer.commit"),
        ),
        "input_audio_buffer_commit_empty",
        ("at least 100 ms", "have 50 ms"),
    ),
    "response_create_with_nothing_committed": WsCase(
        (event("response.create", event_id="evt_bad"),),
        "nothing_to_answer",
        ("commit the input audio buffer", "conversation.item.create"),
        "evt_bad",
    ),
    "response_cancel_with_no_response": WsCase(
        (event("response.cancel", event_id="evt_bad"),),
        "response_cancel_not_active",
        ("no response to cancel",),
        "evt_bad",
    ),
}

# Regressions: these once closed the connection or slipped past the byte limit.
WS_REGRESSION_CASES = {
    "deeply_nested_json": WsCase(("[" * 1500,), "invalid_json", ("not valid JSON",)),
    "integer_over_4300_digits": WsCase(
        ('{"type": "x", "n": ' + "7" * 5000 + "}",), "invalid_json", ("not valid JSON",)
    ),
    "oversize_in_utf8_bytes_only": WsCase(
        (
            json.dumps(
                {"type": "session.update", "session": {"instructions": "€" * 3000}},
                ensure_ascii=False,
            ),
        ),
        "event_too_large",
        ("exceeds server.max_event_bytes = 8192",),
    ),
}

WS_PARAMS = [pytest.param(case, id=name) for name, case in WS_CASES.items()] + [
    pytest.param(case, id=name) for name, case in WS_REGRESSION_CASES.items()
]


@pytest.mark.asyncio
@pytest.mark.parametrize("case", WS_PARAMS)
async def test_websocket_bad_event_gets_an_error_and_the_connection_still_works(
    main: Running, case: WsCase
) -> None:
    async with ws_session(main.ws) as ws:
        for frame in case.frames:
            await ws.send(frame)
        await expect_error(ws, case.code, *case.fragments, event_id=case.event_id)
        await good_turn(ws)


# ------------------------------------------------------------------ WebSocket: stateful cases


@pytest.mark.asyncio
async def test_buffer_over_max_utterance_is_cleared_with_an_error(main: Running) -> None:
    async with ws_session(main.ws) as ws:
        await ws.send(PUSH_TO_TALK)
        await recv_until(ws, "session.updated", [])
        too_long = np.zeros(int((MAX_UTTERANCE_S * 1000 + CHUNK_MS) * 16), np.float32)
        for message in appends(too_long):
            await ws.send(message)
        await expect_error(
            ws, "input_audio_buffer_full", "audio.max_utterance_s = 5 s", "was cleared"
        )
        await good_turn(ws)


async def _held_response(ws: Any, engine: HoldingEngine) -> tuple[HeldFinal, str, list[Any]]:
    """Commit speech and start a response whose end is held back: it stays active."""
    seen: list[dict[str, Any]] = []
    await ws.send(PUSH_TO_TALK)
    await recv_until(ws, "session.updated", seen)
    for message in appends(SPEECH):
        await ws.send(message)
    await ws.send(event("input_audio_buffer.commit"))
    await recv_until(ws, "input_audio_buffer.committed", seen)
    held = engine.hold_next_final()
    await ws.send(event("response.create"))
    created = await recv_until(ws, "response.created", seen)
    return held, created["response"]["id"], seen


@pytest.mark.asyncio
async def test_second_response_create_while_one_is_running(main: Running) -> None:
    async with ws_session(main.ws) as ws:
        held, running, seen = await _held_response(ws, main.engine)
        try:
            await ws.send(event("response.create", event_id="evt_second"))
            while (e := await next_event(ws))["type"] != "error":
                seen.append(e)
            check_error(
                e,
                "conversation_already_has_active_response",
                (f"response {running} is still running",),
                "evt_second",
            )
        finally:
            held.release()
        done = await recv_until(ws, "response.done", seen)
        assert done["response"]["id"] == running
        assert done["response"]["status"] == "completed"
        assert deltas(seen) == SCRIPT
        await good_turn(ws)


@pytest.mark.asyncio
async def test_cancel_naming_an_unknown_response_is_refused(main: Running) -> None:
    async with ws_session(main.ws) as ws:
        held, running, seen = await _held_response(ws, main.engine)
        try:
            await ws.send(event("response.cancel", response_id="resp_unknown"))
            await ws.send(event("sentinel.ping"))  # answered with unknown_event, in order
            while (e := await next_event(ws))["type"] != "error":
                seen.append(e)
            check_error(e, "response_cancel_not_active", ("resp_unknown",))
            await expect_error(ws, "unknown_event", "'sentinel.ping'")
        finally:
            held.release()
        done = await recv_until(ws, "response.done", seen)
        assert done["response"]["id"] == running
        assert done["response"]["status"] == "completed"
        await good_turn(ws)


@pytest.mark.asyncio
async def test_forbidden_origin_is_refused_and_the_pages_own_origin_works(
    main: Running,
) -> None:
    await expect_refused(
        main.ws,
        "forbidden_origin",
        1008,
        "origin https://evil.example is not allowed",
        origin="https://evil.example",
    )
    async with ws_session(main.ws, origin=f"http://127.0.0.1:{main.port}") as ws:
        await good_turn(ws)


@pytest.mark.asyncio
async def test_dns_rebound_origin_is_refused(main: Running) -> None:
    """A page on rebound.example whose name now resolves to 127.0.0.1 opens the WebSocket."""
    rebound = f"rebound.example:{main.port}"
    try:
        async with websockets.connect(
            f"ws://{rebound}/v1/realtime",
            host="127.0.0.1",  # where the rebound name points now
            port=main.port,
            origin=f"http://{rebound}",
        ) as ws:
            first = await next_event(ws)
    except websockets.InvalidStatus:
        return  # refused at the handshake: as good as an error event
    assert first["type"] == "error", f"a page on http://{rebound} got a session: {first}"


# ------------------------------------------------------------------ WebRTC: signalling table


@dataclass(frozen=True)
class OfferCase:
    body: str | bytes
    content_type: str | None
    status: int
    code: str
    fragments: tuple[str, ...]


OFFER_CASES = {
    "garbage_sdp": OfferCase(
        "v=0\r\nm=garbage\r\nthis is not an offer\r\n",
        "application/sdp",
        400,
        "invalid_sdp",
        ("offer",),  # aiortc's parse errors carry no text of their own
    ),
    "body_not_sdp": OfferCase(
        "hello, server", "application/sdp", 400, "invalid_sdp", ("no v=0 / m= lines",)
    ),
    "empty_body": OfferCase("", "application/sdp", 400, "invalid_sdp", ("no v=0 / m= lines",)),
    "body_not_utf8": OfferCase(
        b"v=0\r\nm=audio \xff\xfe\r\n", "application/sdp", 400, "invalid_sdp", ("not UTF-8",)
    ),
    "wrong_content_type": OfferCase(
        json.dumps({"sdp": "v=0"}),
        "application/json",
        415,
        "unsupported_media_type",
        ("expected application/sdp", "got application/json"),
    ),
    "no_content_type": OfferCase(
        "v=0\r\n", None, 415, "unsupported_media_type", ("expected application/sdp", "got nothing")
    ),
    "oversize_sdp": OfferCase(
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" + "a=x-padding\r\n" * 6000,
        "application/sdp",
        413,
        "offer_too_large",
        ("SDP offer over 65536 bytes",),
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(OFFER_CASES.values()), ids=list(OFFER_CASES))
async def test_bad_offer_gets_a_clear_http_error(main: Running, case: OfferCase) -> None:
    reply = await post_offer(main.base_url, case.body, case.content_type)
    check_problem(reply, case.status, case.code, *case.fragments)
    await wait_idle(main.app)  # a refused offer leaves no session or call behind


def multipart(parts: dict[str, str]) -> bytes:
    body = b""
    for name, value in parts.items():
        body += (
            f'--xyz\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
    return body + b"--xyz--\r\n"


MULTIPART = "multipart/form-data; boundary=xyz"
MULTIPART_CASES = {
    "no_sdp_part": OfferCase(
        multipart({"session": "{}"}), MULTIPART, 400, "invalid_sdp", ("no `sdp` part",)
    ),
    "session_not_json": OfferCase(
        multipart({"sdp": "v=0", "session": "{nope"}),
        MULTIPART,
        400,
        "invalid_session",
        ("`session` part",),
    ),
    "session_bad_field": OfferCase(
        multipart({"sdp": "v=0", "session": json.dumps({"type": "banana"})}),
        MULTIPART,
        400,
        "invalid_session",
        ("session.type",),
    ),
    "not_multipart_really": OfferCase(
        b"garbage", MULTIPART, 400, "invalid_request", ("cannot read the multipart body",)
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(MULTIPART_CASES.values()), ids=list(MULTIPART_CASES))
async def test_bad_multipart_offer_gets_a_clear_http_error(main: Running, case: OfferCase) -> None:
    """OpenAI's SDK posts the offer as multipart/form-data (`sdp`, `session`)."""
    reply = await post_offer(main.base_url, case.body, case.content_type)
    check_problem(reply, case.status, case.code, *case.fragments)
    await wait_idle(main.app)


@pytest.mark.asyncio
async def test_offer_without_ice_credentials_is_refused(main: Running) -> None:
    offer = await real_offer()
    mangled = "\r\n".join(
        line for line in offer.split("\r\n") if not line.startswith(("a=ice-ufrag", "a=ice-pwd"))
    )
    reply = await post_offer(main.base_url, mangled)
    check_problem(reply, 400, "invalid_sdp", "ICE username fragment or password is missing")
    await wait_idle(main.app)


@pytest.mark.asyncio
async def test_offer_without_dtls_fingerprint_is_refused(scripted_engine: VoxtralEngine) -> None:
    with running_server(Settings(), HoldingEngine(scripted_engine)) as (url, _app):
        client = RtcClient(wav=None)
        try:
            offer = await client.offer()
            mangled = "\r\n".join(
                line for line in offer.split("\r\n") if not line.startswith("a=fingerprint")
            )
            reply = await post_offer(url, mangled)
        finally:
            await client.close()
    check_problem(reply, 400, "invalid_sdp", "fingerprint")


@pytest.mark.asyncio
async def test_webrtc_turn_after_bad_channel_messages(main: Running) -> None:
    """Bad channel messages on a real call (the wav as its track), then its turn answered."""
    async with rtc_call(main.base_url) as client:
        client.channel.send("{this is not json")
        client.channel.send(b"\x00\x01binary")
        client.channel.send(event("transcription_session.update"))
        client.channel.send(event("session.update", session={"type": "banana"}))
        await client.wait_error("invalid_json", "not valid JSON")
        await client.wait_error("binary_not_supported", "JSON text messages")
        await client.wait_error("unknown_event", "'transcription_session.update'")
        await client.wait_error("invalid_event", "session.type")
        await client.answered_turn()


@pytest.mark.asyncio
async def test_websocket_turn_after_all_bad_input(main: Running) -> None:
    """Every bad case in a row on one connection, then a turn on it and on a new one. (This
    used to be a bare turn that counted on running after the cases above, on the same
    server: alone, or first, it tested nothing.)"""
    async with ws_session(main.ws) as ws:
        for case in [*WS_CASES.values(), *WS_REGRESSION_CASES.values()]:
            for frame in case.frames:
                await ws.send(frame)
            await expect_error(ws, case.code, *case.fragments, event_id=case.event_id)
        await good_turn(ws)
    async with ws_session(main.ws) as ws:
        await good_turn(ws)


# ------------------------------------------------------------------ NaN audio (session path)


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
async def test_non_finite_audio_is_refused_and_the_session_keeps_working(
    scripted_engine: VoxtralEngine, bad: float
) -> None:
    """PCM16 and Opus cannot carry NaN: this is the guard behind every transport."""
    transport = FakeTransport()
    session = Session(scripted_engine, Settings(), transport)
    await session.start()
    try:
        await session.handle_text(PUSH_TO_TALK)
        audio = np.zeros(1600, np.float32)
        audio[800] = bad
        with pytest.raises(p.ProtocolError, match="NaN or infinite") as refused:
            session.append_audio(audio)
        assert refused.value.code == "invalid_audio"
        for message in appends(SPEECH):
            await session.handle_text(message)
        await session.handle_text(event("input_audio_buffer.commit"))
        await session.handle_text(event("response.create"))
        done = await transport.wait_for("response.done", within_s=WAIT_S)
    finally:
        session.close()
    assert done["response"]["status"] == "completed"
    assert deltas(transport.events) == SCRIPT
    assert not transport.of("error")


# ------------------------------------------------------------------ auth token


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "connect",
    [
        {},
        {"additional_headers": {"Authorization": f"Bearer {WRONG_TOKEN}"}},
        {"additional_headers": {"Authorization": f"Basic {TOKEN}"}},
        {"subprotocols": ["realtime", f"openai-insecure-api-key.{WRONG_TOKEN}"]},
    ],
    ids=["no_token", "wrong_bearer", "right_token_wrong_scheme", "wrong_subprotocol_key"],
)
async def test_websocket_without_the_right_token_is_unauthorized(
    token_server: Running, connect: dict[str, Any]
) -> None:
    await expect_refused(
        token_server.ws, "unauthorized", 1008, "missing or wrong auth token", **connect
    )


@pytest.mark.asyncio
async def test_websocket_with_the_token_works(token_server: Running) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with ws_session(token_server.ws, additional_headers=headers) as ws:
        await good_turn(ws)
    key = ["realtime", f"openai-insecure-api-key.{TOKEN}"]  # how a browser sends it
    async with ws_session(token_server.ws, subprotocols=key) as ws:
        assert ws.subprotocol == "realtime"
        await good_turn(ws)


@pytest.mark.asyncio
@pytest.mark.parametrize("token", [None, WRONG_TOKEN], ids=["no_token", "wrong_token"])
async def test_webrtc_offer_without_the_right_token_is_unauthorized(
    token_server: Running, token: str | None
) -> None:
    reply = await post_offer(token_server.base_url, await real_offer(), token=token)
    check_problem(reply, 401, "unauthorized", "missing or wrong auth token")


@pytest.mark.asyncio
async def test_webrtc_call_with_the_token_works(token_server: Running) -> None:
    async with rtc_call(token_server.base_url, token=TOKEN) as client:
        await client.answered_turn()


# ------------------------------------------------------------------ too many sessions


@pytest.mark.asyncio
async def test_websocket_holds_the_only_slot(single_server: Running) -> None:
    await wait_idle(single_server.app)
    async with ws_session(single_server.ws) as first:
        await expect_refused(single_server.ws, "too_many_sessions", 1013, "server.max_sessions = 1")
        reply = await post_offer(single_server.base_url, await real_offer())
        check_problem(reply, 503, "too_many_sessions", "server.max_sessions = 1")
        await good_turn(first)  # the open conversation is unaffected
    await wait_idle(single_server.app)
    async with ws_session(single_server.ws) as ws:  # the slot is free again
        await good_turn(ws)


@pytest.mark.asyncio
async def test_webrtc_call_holds_the_only_slot(single_server: Running) -> None:
    await wait_idle(single_server.app)
    async with rtc_call(single_server.base_url) as client:
        await expect_refused(single_server.ws, "too_many_sessions", 1013, "server.max_sessions = 1")
        reply = await post_offer(single_server.base_url, await real_offer())
        check_problem(reply, 503, "too_many_sessions", "server.max_sessions = 1")
        await client.answered_turn()
    await wait_idle(single_server.app)
    async with ws_session(single_server.ws) as ws:
        await good_turn(ws)
