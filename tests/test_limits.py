"""What one client can hold, and who gets the TURN credential: defects an adversarial run found.

- `/v1/client-config` needs the token when one is configured, and mints short-lived coturn
  REST-API credentials (`webrtc.turn_secret`) that a real coturn accepts;
- a quiet client is told `idle_timeout` and closed (`server.idle_timeout_s`), on both
  transports;
- one address cannot take every slot (`server.max_sessions_per_client`), and offers that
  never connect cannot either (`webrtc.max_pending_calls`);
- a connection that never completes its request headers is closed
  (`server.request_header_timeout_s`).

Waits are bounded by `scaled(...)` (longer under load); nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
import websockets
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from coturn import coturn
from servers import SharedEngine

from voxtral_server.api.app import create_app
from voxtral_server.api.http_limits import uvicorn_options
from voxtral_server.api.inprocess import InProcessServer
from voxtral_server.api.security import turn_credential
from voxtral_server.config import ConfigError, Settings, load_settings
from voxtral_server.models.voxtral import VoxtralEngine

TOKEN = "limits-test-token-0123456789"
TURN_SECRET = "north-secret-0123456789"


def scaled(base_s: float) -> float:
    """A wait bound that grows with the machine's load (never a threshold under test)."""
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return base_s * max(1.0, load)


def make_settings(**sections: dict[str, Any]) -> Settings:
    return Settings.model_validate(sections)


@contextmanager
def serving(settings: Settings, engine: Any) -> Iterator[InProcessServer]:
    """The app under uvicorn with the same connection limits `voxtral-server serve` sets."""
    app = create_app(settings, engine_factory=lambda s: SharedEngine(engine))
    with InProcessServer(app, **uvicorn_options(settings)) as server:
        yield server


def ws_url(server: InProcessServer) -> str:
    return server.base_url.replace("http://", "ws://", 1) + "/v1/realtime"


async def next_event(ws: Any) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), scaled(20)))
    return event


async def until_event(ws: Any, type_: str) -> dict[str, Any]:
    while True:
        event = await next_event(ws)
        if event["type"] == type_:
            return event


async def offer_sdp(pc: RTCPeerConnection) -> str:
    await pc.setLocalDescription(await pc.createOffer())
    sdp: str = pc.localDescription.sdp
    return sdp


async def post_offer(
    server: InProcessServer, sdp: str, local_address: str | None = None
) -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(local_address=local_address)
    async with httpx.AsyncClient(transport=transport, timeout=scaled(20)) as http:
        return await http.post(
            f"{server.base_url}/v1/realtime/calls",
            content=sdp,
            headers={"content-type": "application/sdp"},
        )


class ChannelClient:
    """An aiortc peer with only the events channel (no audio): what a slot-holder sends."""

    def __init__(self, config: RTCConfiguration | None = None) -> None:
        self.pc = RTCPeerConnection(config or RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("oai-events")
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.channel.on("message", lambda m: self.events.put_nowait(json.loads(m)))
        self.channel.on("close", self.closed.set)

    async def call(self, server: InProcessServer) -> None:
        reply = await post_offer(server, await offer_sdp(self.pc))
        assert reply.status_code == 201, reply.text
        await self.pc.setRemoteDescription(RTCSessionDescription(reply.text, "answer"))

    async def until(self, type_: str) -> dict[str, Any]:
        async with asyncio.timeout(scaled(30)):
            while True:
                event = await self.events.get()
                if event["type"] == type_:
                    return event


@asynccontextmanager
async def channel_clients(n: int) -> AsyncIterator[list[ChannelClient]]:
    clients = [ChannelClient() for _ in range(n)]
    try:
        yield clients
    finally:
        await asyncio.gather(*(c.pc.close() for c in clients))


def wait_server_idle(server: InProcessServer, within_s: float) -> None:
    """Until the server has no conversation left (its own `idle` event)."""
    server.run(asyncio.wait_for(server.state.idle.wait(), within_s), within_s + 5)


# ------------------------------------------------------------------ TURN credentials


def test_the_turn_credential_is_coturns_rest_api_hmac() -> None:
    # coturn's REST API (turnserver --use-auth-secret): password =
    # base64(HMAC-SHA1(static-auth-secret, "<expiry>:<label>")). Expected value from
    # `printf '%s' 1700000600:voxtral | openssl dgst -sha1 -hmac SECRET -binary | base64`.
    username, password = turn_credential(TURN_SECRET, 1_700_000_600)
    assert username == "1700000600:voxtral"
    assert password == "XVKNGl9AdmFUhCsw8JSNxefcyB0="


@pytest.mark.asyncio
async def test_client_config_needs_the_token_and_keeps_turn_credentials_from_others(
    scripted_engine: VoxtralEngine,
) -> None:
    ice = [{"urls": ["turn:127.0.0.1:3478?transport=tcp"], "username": "u", "credential": "pw"}]
    settings = make_settings(server={"auth_token": TOKEN}, webrtc={"ice_servers": ice})
    with serving(settings, scripted_engine) as server:
        async with httpx.AsyncClient(timeout=scaled(20)) as http:
            anyone = await http.get(f"{server.base_url}/v1/client-config")
            wrong = await http.get(
                f"{server.base_url}/v1/client-config",
                headers={"authorization": "Bearer not-the-token-at-all"},
            )
            holder = await http.get(
                f"{server.base_url}/v1/client-config",
                headers={"authorization": f"Bearer {TOKEN}"},
            )
    for refused in (anyone, wrong):
        assert refused.status_code == 401
        assert refused.json()["auth_required"] is True  # the page knows to ask for a token
        assert "pw" not in refused.text and "turn:" not in refused.text
    assert holder.status_code == 200
    assert holder.json()["webrtc"]["ice_servers"][0]["credential"] == "pw"


@pytest.mark.asyncio
async def test_client_config_mints_a_time_limited_turn_credential(
    scripted_engine: VoxtralEngine,
) -> None:
    ice = [{"urls": ["turn:127.0.0.1:3478?transport=tcp"]}, {"urls": ["stun:127.0.0.1:3478"]}]
    settings = make_settings(webrtc={"ice_servers": ice, "turn_secret": TURN_SECRET})
    with serving(settings, scripted_engine) as server:
        before = time.time()
        async with httpx.AsyncClient(timeout=scaled(20)) as http:
            reply = await http.get(f"{server.base_url}/v1/client-config")
        after = time.time()
    assert reply.status_code == 200
    assert reply.headers["cache-control"] == "no-store"
    turn, stun = reply.json()["webrtc"]["ice_servers"]
    expiry, label = turn["username"].split(":", 1)
    ttl = settings.webrtc.turn_ttl_s
    assert int(before) + ttl <= int(expiry) <= int(after) + ttl
    assert label == "voxtral"
    digest = hmac.new(TURN_SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
    assert turn["credential"] == base64.b64encode(digest).decode()
    assert "username" not in stun and "credential" not in stun  # STUN needs none


def test_bad_turn_and_limit_settings_stop_start_up_naming_the_key(tmp_path: Any) -> None:
    cases = {
        "webrtc:\n  ice_servers: [{urls: ['turn:h:3478']}]\n": "webrtc",
        "webrtc:\n  turn_secret: short\n": "webrtc.turn_secret",
        "webrtc:\n  turn_ttl_s: 5\n": "webrtc.turn_ttl_s",
        "webrtc:\n  max_pending_calls: 0\n": "webrtc.max_pending_calls",
        "server:\n  idle_timeout_s: -1\n": "server.idle_timeout_s",
        "server:\n  max_sessions_per_client: 0\n": "server.max_sessions_per_client",
        "server:\n  request_header_timeout_s: 0\n": "server.request_header_timeout_s",
    }
    for text, key in cases.items():
        path = tmp_path / "config.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as error:
            load_settings(path, environ={})
        assert key in str(error.value), (text, str(error.value))
    # The TURN server without credentials is named with its URL and what to set.
    path.write_text("webrtc:\n  ice_servers: [{urls: ['turn:h:3478']}]\n")
    with pytest.raises(ConfigError, match="turn_secret"):
        load_settings(path, environ={})


@pytest.fixture
def coturn_rest() -> Iterator[int]:
    """coturn in REST-API mode (shared secret): its port."""
    with coturn("--use-auth-secret", f"--static-auth-secret={TURN_SECRET}") as port:
        yield port


async def _allocate(port: int, username: str, password: str) -> None:
    """A TURN allocation over TCP, as a browser's relay candidate makes one."""
    from aioice.turn import create_turn_endpoint

    transport, _ = await create_turn_endpoint(
        asyncio.DatagramProtocol,
        server_addr=("127.0.0.1", port),
        username=username,
        password=password,
        transport="tcp",
    )
    transport.close()


@pytest.mark.asyncio
async def test_a_minted_credential_relays_a_call_through_a_real_coturn(
    scripted_engine: VoxtralEngine, coturn_rest: int
) -> None:
    ice = [{"urls": [f"turn:127.0.0.1:{coturn_rest}?transport=tcp"]}]
    settings = make_settings(
        server={"auth_token": TOKEN},
        webrtc={"ice_servers": ice, "turn_secret": TURN_SECRET, "ice_transport_policy": "relay"},
    )
    with serving(settings, scripted_engine) as server:
        async with httpx.AsyncClient(timeout=scaled(20)) as http:
            reply = await http.get(
                f"{server.base_url}/v1/client-config",
                headers={"authorization": f"Bearer {TOKEN}"},
            )
        servers = [RTCIceServer(**s) for s in reply.json()["webrtc"]["ice_servers"]]
        # Relay only, like the page through an SSH tunnel: the offer has candidates only if
        # coturn accepted the minted credential.
        client = ChannelClient(
            RTCConfiguration(iceServers=servers, iceTransportPolicy=RTCIceTransportPolicy.RELAY)
        )
        try:
            sdp = await offer_sdp(client.pc)
            assert " typ relay" in sdp, "coturn refused the minted credential"
            async with httpx.AsyncClient(timeout=scaled(20)) as http:
                answer = await http.post(
                    f"{server.base_url}/v1/realtime/calls",
                    content=sdp,
                    headers={"content-type": "application/sdp", "authorization": f"Bearer {TOKEN}"},
                )
            assert answer.status_code == 201, answer.text
            await client.pc.setRemoteDescription(RTCSessionDescription(answer.text, "answer"))
            await client.until("session.created")  # the call works over the relay
        finally:
            await client.pc.close()
    # The expiry is coturn's to enforce: an expired credential opens no relay.
    stale_user, stale_password = turn_credential(TURN_SECRET, int(time.time()) - 60)
    with pytest.raises(Exception, match="(?i)401|unauthori"):
        await asyncio.wait_for(_allocate(coturn_rest, stale_user, stale_password), scaled(20))
    fresh_user, fresh_password = turn_credential(TURN_SECRET, int(time.time()) + 60)
    await asyncio.wait_for(_allocate(coturn_rest, fresh_user, fresh_password), scaled(20))


# ------------------------------------------------------------------ idle sessions


@pytest.mark.asyncio
async def test_an_idle_websocket_is_told_idle_timeout_and_closed(
    scripted_engine: VoxtralEngine,
) -> None:
    settings = make_settings(server={"idle_timeout_s": 0.5})
    with serving(settings, scripted_engine) as server:
        async with websockets.connect(ws_url(server)) as ws:
            await until_event(ws, "session.created")
            event = await until_event(ws, "error")  # the client sends nothing at all
            assert event["error"]["code"] == "idle_timeout"
            assert "server.idle_timeout_s" in event["error"]["message"]
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), scaled(20))
        wait_server_idle(server, scaled(20))


@pytest.mark.asyncio
async def test_an_idle_webrtc_call_is_told_idle_timeout_and_closed(
    scripted_engine: VoxtralEngine,
) -> None:
    settings = make_settings(server={"idle_timeout_s": 0.5})
    with serving(settings, scripted_engine) as server:
        async with channel_clients(1) as (client,):
            await client.call(server)
            await client.until("session.created")
            event = await client.until("error")  # no events, no audio track
            assert event["error"]["code"] == "idle_timeout"
            await asyncio.wait_for(client.closed.wait(), scaled(20))
        wait_server_idle(server, scaled(20))


@pytest.mark.asyncio
async def test_without_an_idle_timeout_a_quiet_websocket_stays_open(
    scripted_engine: VoxtralEngine,
) -> None:
    settings = make_settings(server={"idle_timeout_s": 0})
    with serving(settings, scripted_engine) as server:
        async with websockets.connect(ws_url(server)) as ws:
            await until_event(ws, "session.created")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 1.0)  # nothing comes, nothing closes
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            assert (await until_event(ws, "input_audio_buffer.cleared"))["type"]


# ------------------------------------------------------------------ slots per client


@pytest.mark.asyncio
async def test_one_address_cannot_take_every_slot_on_either_transport(
    scripted_engine: VoxtralEngine,
) -> None:
    settings = make_settings(server={"max_sessions_per_client": 2})
    with serving(settings, scripted_engine) as server:
        async with websockets.connect(ws_url(server)) as first, channel_clients(2) as calls:
            await until_event(first, "session.created")
            await calls[0].call(server)  # the second conversation from 127.0.0.1
            # A third, on either transport, is refused with the key named.
            async with websockets.connect(ws_url(server)) as third:
                event = await next_event(third)
                assert event["error"]["code"] == "too_many_sessions_from_client"
                assert "server.max_sessions_per_client = 2" in event["error"]["message"]
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(third.recv(), scaled(20))
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            reply = await post_offer(server, await offer_sdp(calls[1].pc))
            assert reply.status_code == 503
            assert reply.text.startswith("too_many_sessions_from_client:")
            assert "server.max_sessions_per_client" in reply.text
            # Another address still gets in.
            other = await post_offer(server, reply.request.content.decode(), "127.0.0.2")
            assert other.status_code == 201, other.text


@pytest.mark.asyncio
async def test_offers_that_never_connect_cannot_hold_every_slot(
    scripted_engine: VoxtralEngine,
) -> None:
    settings = make_settings(
        webrtc={"max_pending_calls": 2, "connect_timeout_s": 1}, server={"max_sessions": 8}
    )
    with serving(settings, scripted_engine) as server:
        # Offers whose answers are never applied: ICE cannot complete, as with a fake peer.
        async with channel_clients(4) as holders:
            replies = [await post_offer(server, await offer_sdp(c.pc)) for c in holders]
            assert [r.status_code for r in replies] == [201, 201, 503, 503]
            assert replies[2].text.startswith("too_many_pending_calls:")
            assert "webrtc.max_pending_calls" in replies[2].text
            # Meanwhile a WebSocket conversation starts as usual.
            async with websockets.connect(ws_url(server)) as ws:
                await until_event(ws, "session.created")
            # The watchdog ends them (webrtc.connect_timeout_s); then a call that connects
            # passes through the pending budget and leaves it.
            wait_server_idle(server, scaled(30))
            async with channel_clients(1) as (client,), channel_clients(2) as more:
                await client.call(server)
                await client.until("session.created")
                # Connected, it no longer counts as pending: two more offers fit again.
                replies = [await post_offer(server, await offer_sdp(c.pc)) for c in more]
                assert [r.status_code for r in replies] == [201, 201]


# ------------------------------------------------------------------ half-open HTTP


@pytest.mark.asyncio
async def test_connections_that_never_complete_a_request_are_closed(
    scripted_engine: VoxtralEngine,
) -> None:
    settings = make_settings(server={"request_header_timeout_s": 0.5})
    with serving(settings, scripted_engine) as server:
        port = server.port

        def half_open(payload: bytes) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(payload)
            return sock

        socks = [half_open(b"GET /healthz HT") for _ in range(4)]
        socks.append(half_open(b""))  # connects and says nothing
        socks.append(half_open(b"GET /healthz HTTP/1.1\r\nHost: x\r\n"))  # headers unfinished
        try:
            for sock in socks:
                sock.settimeout(scaled(20))
                assert sock.recv(1024) == b""  # EOF: the server closed it
        finally:
            for sock in socks:
                sock.close()
        # A complete request on a fresh connection is still served.
        async with httpx.AsyncClient(timeout=scaled(20)) as http:
            assert (await http.get(f"{server.base_url}/healthz")).status_code == 200
