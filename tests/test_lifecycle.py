"""Start, readiness, disconnects, watchdog and shutdown: nothing left running, counted."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from clients import Client, cli, ptt_events, ws_until
from conftest import engine_settings
from fakes import StubEngine
from patience import scaled
from servers import SharedEngine, idle, on_server, running_server
from wire import session_update

from voxtral_server.config import Settings
from voxtral_server.models.chunking import ChunkSink
from voxtral_server.models.tiny import build_tiny
from voxtral_server.models.types import Chunk, Request, RequestHandle
from voxtral_server.models.voxtral import VoxtralEngine

LONG = " ".join(f"word{i}" for i in range(150))  # an answer long enough to interrupt


class RecordingEngine(SharedEngine):
    """Keeps every handle and final chunk, to check what happened to generation."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.handles: list[RequestHandle] = []
        self.finals: list[Chunk] = []
        self.modes: list[str] = []  # the mode of each final's request, in the same order
        self.finished = threading.Condition()

    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        def record(chunk: Chunk) -> None:
            if chunk.is_final:
                with self.finished:
                    self.finals.append(chunk)
                    self.modes.append(request.mode)
                    self.finished.notify_all()
            sink(chunk)

        handle = super().submit(request, record)
        self.handles.append(handle)
        return handle

    def wait_finals(self, count: int) -> list[Chunk]:
        with self.finished:
            assert self.finished.wait_for(lambda: len(self.finals) >= count, 60)
        return self.finals


@pytest.fixture(scope="module")
def long_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VoxtralEngine]:
    model = build_tiny(tmp_path_factory.mktemp("tiny-long"), script=LONG)
    engine = VoxtralEngine.load(engine_settings(model))
    yield engine
    engine.close()


@pytest.fixture
def server(long_engine: VoxtralEngine) -> Iterator[tuple[str, Any, RecordingEngine]]:
    engine = RecordingEngine(long_engine)
    with running_server(Settings(), engine) as (url, app):
        yield url, app, engine


@pytest.mark.asyncio
async def test_websocket_disconnect_mid_response_stops_generation(
    server: tuple[str, Any, RecordingEngine],
) -> None:
    url, app, engine = server
    baseline = on_server(app, idle(app))
    threads = threading.active_count()
    ws_url = url.replace("http", "ws") + "/v1/realtime"
    async with websockets.connect(ws_url) as ws:
        for event in ptt_events():
            await ws.send(event)
        await ws_until(ws, "response.output_text.delta")
    final = engine.wait_finals(1)[0]
    assert final.totals is not None and final.totals.status == "cancelled"
    assert final.totals.tokens < 300  # stopped long before the end of the answer
    assert on_server(app, idle(app)) == baseline
    assert threading.active_count() == threads
    async with websockets.connect(ws_url) as ws:  # the next session's turn succeeds
        for event in ptt_events():
            await ws.send(event)
        done = await ws_until(ws, "response.done")
    assert done["response"]["status"] == "completed"


@pytest.mark.asyncio
async def test_disconnect_while_the_users_words_are_written_down_stops_that_too(
    server: tuple[str, Any, RecordingEngine],
) -> None:
    """Captions run on the engine beside the answer: a client that leaves mid-caption
    leaves nothing generating."""
    url, app, engine = server
    baseline = on_server(app, idle(app))
    captions = session_update(transcription={"model": "whisper-1"}, turn_detection=None)
    async with websockets.connect(url.replace("http", "ws") + "/v1/realtime") as ws:
        for event in [captions, *ptt_events()[1:]]:
            await ws.send(event)
        await ws_until(ws, "conversation.item.input_audio_transcription.delta")
    finals = engine.wait_finals(2)
    caption = [f for f, mode in zip(finals, engine.modes, strict=True) if mode == "transcribe"][-1]
    assert caption.totals is not None and caption.totals.status == "cancelled"
    assert caption.totals.tokens < 300  # stopped long before the end of its 150 words
    assert on_server(app, idle(app)) == baseline


@pytest.mark.asyncio
async def test_webrtc_disconnect_mid_response_stops_generation(
    server: tuple[str, Any, RecordingEngine],
) -> None:
    url, app, engine = server
    baseline = on_server(app, idle(app))
    client = Client()
    await client.connect(url, wav=None)
    await client.wait_for("session.created")
    for event in ptt_events():
        client.channel.send(event)
    await client.wait_for("response.output_text.delta")
    await client.close()
    final = engine.wait_finals(1)[0]
    assert final.totals is not None and final.totals.status == "cancelled"
    assert on_server(app, idle(app)) == baseline
    assert not app.state.server.peers.calls
    again = Client()
    try:
        await again.connect(url, wav=None)
        await again.wait_for("session.created")
        for event in ptt_events():
            again.channel.send(event)
        assert (await again.wait_for("response.done"))["response"]["status"] == "completed"
    finally:
        await again.close()


@pytest.mark.asyncio
async def test_unconnected_peer_is_closed_by_the_watchdog(long_engine: VoxtralEngine) -> None:
    settings = Settings.model_validate({"webrtc": {"connect_timeout_s": 0.5}})
    with running_server(settings, SharedEngine(long_engine)) as (url, app):
        client = Client()
        await client.pc.setLocalDescription(await client.pc.createOffer())
        async with httpx.AsyncClient() as http:
            reply = await http.post(
                f"{url}/v1/realtime/calls",
                content=client.pc.localDescription.sdp,
                headers={"content-type": "application/sdp"},
            )
        assert reply.status_code == 201
        assert len(app.state.server.peers.calls) == 1
        # The answer is never applied: ICE cannot complete, and the watchdog closes the call.
        on_server(app, idle(app), within_s=scaled(10, 60))
        assert not app.state.server.sessions
        await client.close()


def test_health_answers_while_loading_and_ready_after() -> None:
    release = threading.Event()

    class SlowEngine(StubEngine):
        pass

    def factory(settings: Settings) -> SlowEngine:
        release.wait(30)
        return SlowEngine()

    from voxtral_server.api.app import create_app
    from voxtral_server.api.inprocess import InProcessServer

    app = create_app(Settings(), engine_factory=factory)
    server = InProcessServer(app).start(wait_loaded=False)
    try:
        assert httpx.get(f"{server.base_url}/healthz").status_code == 200
        loading = httpx.get(f"{server.base_url}/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        release.set()
        server.run(app.state.server.wait_loaded(), 30)
        assert httpx.get(f"{server.base_url}/readyz").json()["status"] == "ready"
    finally:
        release.set()
        server.stop()


def test_readyz_says_when_the_engine_is_down_and_names_its_endpoints() -> None:
    """An engine that serves through others (vLLM) can be loaded yet unable to answer."""
    from voxtral_server.api.app import create_app
    from voxtral_server.api.inprocess import InProcessServer

    class RemoteEngine(StubEngine):
        ready = False

        def describe(self) -> dict[str, Any]:
            return {"engine": "vllm", "endpoints": [{"url": "http://a:8001", "up": self.ready}]}

    engine = RemoteEngine()
    with InProcessServer(create_app(Settings(), engine_factory=lambda s: engine)) as server:
        down = httpx.get(f"{server.base_url}/readyz")
        assert down.status_code == 503 and down.json()["status"] == "engine_down"
        assert down.json()["endpoints"] == [{"url": "http://a:8001", "up": False}]
        engine.ready = True
        up = httpx.get(f"{server.base_url}/readyz")
        assert up.status_code == 200 and up.json()["status"] == "ready"
        assert up.json()["endpoints"][0]["up"] is True


def test_failed_load_is_reported_by_readyz(tmp_path: Path) -> None:
    from voxtral_server.api.app import create_app

    settings = engine_settings(tmp_path / "no-model")
    app = create_app(settings)
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        asyncio.run_coroutine_threadsafe(
            app.state.server.wait_loaded(), app.state.server_loop
        ).result(30)
        reply = client.get("/readyz")
    assert reply.status_code == 503
    assert reply.json()["status"] == "failed" and "make-tiny" in reply.json()["error"]


@pytest.mark.asyncio
async def test_shutdown_closes_sessions_and_calls(long_engine: VoxtralEngine) -> None:
    engine = RecordingEngine(long_engine)
    threads = threading.active_count()
    client = Client()
    with running_server(Settings(), engine) as (url, app):
        async with websockets.connect(url.replace("http", "ws") + "/v1/realtime") as ws:
            await ws_until(ws, "session.created")
            await client.connect(url, wav=None)
            await client.wait_for("session.created")
            for event in ptt_events():
                await ws.send(event)
            await ws_until(ws, "response.output_text.delta")
            state = app.state.server
            assert len(state.sessions) == 2 and len(state.peers.calls) == 1
            # Leaving the block stops the server while the WebSocket answer is running.
    await client.close()
    assert not state.sessions and not state.peers.calls
    final = engine.wait_finals(1)[0]
    assert final.totals is not None and final.totals.status == "cancelled"
    assert threading.active_count() == threads


def test_serve_refuses_a_public_address_without_a_token() -> None:
    run = cli("serve", "--host", "0.0.0.0", "--model", "unused")
    assert run.returncode == 2
    assert "auth_token" in run.stderr and "--insecure" in run.stderr
