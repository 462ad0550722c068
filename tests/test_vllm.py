"""The vLLM engine (`engine.kind: vllm`).

Fast tests drive `VllmEngine` against small fake OpenAI-compatible servers (FastAPI in this
process): routing, mark-down and probe backoff, cancel, delta timeout, API key, no endpoint.
The slow ones start real vLLM servers (its own cached venv, see `vllm_server.py`) on a tiny
Mistral-format model and talk to our server over the WebSocket, as a client would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from conftest import speech_like
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from patience import scaled
from vllm_server import VllmServer, VllmUnavailable, ensure_vllm, free_port
from wire import session_update

from voxtral_server.api.app import create_app
from voxtral_server.api.inprocess import InProcessServer
from voxtral_server.config import Settings
from voxtral_server.models.audio import wav_bytes
from voxtral_server.models.tiny_mistral import build_tiny_mistral
from voxtral_server.models.types import Chunk, EngineError
from voxtral_server.models.types import Request as EngineRequest
from voxtral_server.models.vllm import VllmEngine, probe_delays

AUDIO = speech_like(1.0)
WAIT_S = scaled(30.0, 120.0)  # upper bound for one event to arrive; never a pass/fail threshold


# --------------------------------------------------------------------------- fakes


@dataclass
class FakeVllm:
    """An OpenAI-compatible streaming server with knobs: what it says, where it stalls."""

    # Each delta's text, or a whole `delta` object (e.g. one carrying `tool_calls`).
    deltas: list[str | dict[str, Any]] = field(default_factory=lambda: ["Hello ", "from ", "fake."])
    hold_after: int | None = None  # stall after this many deltas until released
    die_after: int | None = None  # drop the connection after this many deltas
    status: int = 200  # of the completion endpoints
    finish_reason: str | None = None  # sent with the last delta
    health_failures: int = 0  # /health answers 503 this many more times
    requests: list[dict[str, Any]] = field(default_factory=list)
    health_calls: int = 0
    closed_early: threading.Event = field(default_factory=threading.Event)
    server: InProcessServer | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.base_url

    def release(self) -> None:
        assert self.server is not None
        self.server.loop.call_soon_threadsafe(self._release.set)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> JSONResponse:
            self.health_calls += 1
            if self.health_failures > 0:
                self.health_failures -= 1
                return JSONResponse({}, status_code=503)
            return JSONResponse({})

        @app.get("/v1/models")
        async def models(request: Request) -> JSONResponse:
            self._record(request, None)
            return JSONResponse({"data": [{"id": "fake-model"}]})

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            return self._answer(request, await request.json(), "chat.completion.chunk")

        @app.post("/v1/audio/transcriptions")
        async def transcriptions(request: Request) -> Any:
            return self._answer(request, await request.body(), "transcription.chunk")

        return app

    def _record(self, request: Request, body: Any) -> None:
        self.requests.append(
            {"path": request.url.path, "auth": request.headers.get("authorization"), "body": body}
        )

    def _answer(self, request: Request, body: Any, kind: str) -> Any:
        self._record(request, body)
        if self.status != 200:
            return JSONResponse({"error": {"message": "fake failure"}}, status_code=self.status)
        return StreamingResponse(self._events(kind), media_type="text/event-stream")

    async def _events(self, kind: str) -> AsyncIterator[str]:
        finished = False
        try:
            for i, text in enumerate(self.deltas):
                if i == self.hold_after:
                    await self._release.wait()
                if i == self.die_after:
                    raise ConnectionAbortedError("fake endpoint died")
                delta = text if isinstance(text, dict) else {"content": text}
                choice: dict[str, Any] = {"delta": delta}
                if i == len(self.deltas) - 1 and self.finish_reason is not None:
                    choice["finish_reason"] = self.finish_reason
                event = {"object": kind, "choices": [choice]}
                event["usage"] = {"completion_tokens": i + 1}
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.closed_early.set()


@pytest.fixture
def fakes() -> Iterator[list[FakeVllm]]:
    """Two fake endpoints, started; released and stopped after the test."""
    servers = [FakeVllm(), FakeVllm()]
    for fake in servers:
        fake.server = InProcessServer(fake.app()).start(wait_loaded=False)
    yield servers
    for fake in servers:
        fake.release()
        assert fake.server is not None
        fake.server.stop()


def vllm_settings(endpoints: list[str], **vllm: Any) -> Settings:
    data = Settings().model_dump()
    data["engine"].update({"kind": "vllm", "vllm": {"endpoints": endpoints, **vllm}})
    data["logging"]["file"] = None
    return Settings.model_validate(data)


class Collector:
    """A sink that keeps the chunks of one turn, readable from the test thread."""

    def __init__(self) -> None:
        self.chunks: queue.Queue[Chunk] = queue.Queue()
        self.seen: list[Chunk] = []

    def __call__(self, chunk: Chunk) -> None:
        self.chunks.put(chunk)

    def next(self) -> Chunk:
        chunk = self.chunks.get(timeout=WAIT_S)
        self.seen.append(chunk)
        return chunk

    def final(self) -> Chunk:
        while not (chunk := self.next()).is_final:
            pass
        assert self.chunks.empty()
        return chunk


@pytest.fixture
def engines() -> Iterator[list[VllmEngine]]:
    """Engines a test loads are closed after it, even when it fails."""
    made: list[VllmEngine] = []
    yield made
    for engine in made:
        engine.close()


# --------------------------------------------------------------------------- fast tests


def test_probe_backoff_doubles_up_to_the_cap() -> None:
    delays = probe_delays(0.5, 3.0)
    assert [next(delays) for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_turns_go_to_the_endpoint_with_fewest_in_flight(
    fakes: list[FakeVllm], engines: list[VllmEngine]
) -> None:
    a, b = fakes
    for fake in fakes:
        fake.hold_after = 1  # each turn stays in flight after its first word
    engine = VllmEngine.load(vllm_settings([a.url, b.url]))
    engines.append(engine)

    first, second, third = Collector(), Collector(), Collector()
    engine.submit(EngineRequest(AUDIO, "chat"), first)
    assert first.next().text == "Hello"
    engine.submit(EngineRequest(AUDIO, "chat"), second)
    assert second.next().text == "Hello"
    assert [len(f.requests) - 1 for f in fakes] == [1, 1]  # one /v1/models each, then a turn
    assert [e["in_flight"] for e in engine.describe()["endpoints"]] == [1, 1]
    assert engine.queue_depth == 2

    a.release()  # A's turn ends: A now has none in flight, B one
    assert first.final().totals.status == "completed"  # type: ignore[union-attr]
    engine.submit(EngineRequest(AUDIO, "chat"), third)
    assert third.next().text == "Hello"
    assert [len(f.requests) - 1 for f in fakes] == [2, 1]
    b.release()
    for turn in (second, third):
        final = turn.final()
        assert final.totals is not None and final.totals.answer == "Hello from fake."


def test_a_failing_endpoint_is_marked_down_and_probed_with_backoff(
    fakes: list[FakeVllm], engines: list[VllmEngine]
) -> None:
    a, b = fakes
    delays: list[float] = []
    changes: queue.Queue[dict[str, Any]] = queue.Queue()

    async def recording_sleep(seconds: float) -> None:
        delays.append(seconds)  # the backoff, without waiting for it

    settings = vllm_settings([a.url, b.url], probe_interval_s=0.5, probe_max_interval_s=2.0)
    engine = VllmEngine.load(settings, sleep=recording_sleep, on_change=changes.put)
    engines.append(engine)
    a.status = 500
    a.health_failures = 3  # the first three probes find it still down

    turn = Collector()
    engine.submit(EngineRequest(AUDIO, "chat"), turn)
    final = turn.final().totals
    assert final is not None and final.status == "error"
    assert final.error_code == "endpoint_failed"
    assert final.error is not None and a.url in final.error

    down = changes.get(timeout=WAIT_S)
    assert [e["up"] for e in down["endpoints"]] == [False, True]
    a.status = 200
    up = changes.get(timeout=WAIT_S)
    assert [e["up"] for e in up["endpoints"]] == [True, True]
    assert delays == [0.5, 1.0, 2.0, 2.0]
    assert a.health_calls == 1 + 4  # the check at load, then the probes

    for _ in range(2):  # B first (it has had fewer turns), then A: A takes turns again
        again = Collector()
        engine.submit(EngineRequest(AUDIO, "chat"), again)
        assert again.final().totals.status == "completed"  # type: ignore[union-attr]
    assert [r["path"] for r in a.requests].count("/v1/chat/completions") == 2


def test_a_turn_caught_on_a_dying_endpoint_fails_and_later_turns_go_elsewhere(
    fakes: list[FakeVllm], engines: list[VllmEngine]
) -> None:
    a, b = fakes
    engine = VllmEngine.load(vllm_settings([a.url, b.url], probe_interval_s=60))
    engines.append(engine)
    a.die_after = 1
    a.health_failures = 10**6  # from now on it stays down

    turn = Collector()
    engine.submit(EngineRequest(AUDIO, "chat"), turn)
    assert turn.next().text == "Hello"
    final = turn.final().totals
    assert final is not None and final.status == "error"
    assert final.error_code == "endpoint_failed"
    assert final.error is not None and a.url in final.error and "mid-answer" in final.error
    assert final.answer == "Hello"  # what was handed out before it died
    assert [e["up"] for e in engine.describe()["endpoints"]] == [False, True]
    assert engine.ready

    for _ in range(2):
        later = Collector()
        engine.submit(EngineRequest(AUDIO, "chat"), later)
        assert later.final().totals.status == "completed"  # type: ignore[union-attr]
    assert [r["path"] for r in b.requests].count("/v1/chat/completions") == 2


def test_with_no_endpoint_up_turns_are_refused_and_the_engine_is_not_ready(
    engines: list[VllmEngine],
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    engine = VllmEngine.load(vllm_settings([nobody], probe_interval_s=60))
    engines.append(engine)
    assert not engine.ready
    (endpoint,) = engine.describe()["endpoints"]
    assert endpoint["up"] is False and "Connect" in endpoint["error"]
    with pytest.raises(EngineError) as refused:
        engine.submit(EngineRequest(AUDIO, "chat"), Collector())
    assert refused.value.code == "no_endpoint"
    assert nobody in str(refused.value)


def test_cancel_closes_the_stream_and_measures_the_cancel_latency(
    fakes: list[FakeVllm], engines: list[VllmEngine]
) -> None:
    a, _ = fakes
    a.deltas = ["Hello ", "world ", "never ", "sent."]
    a.hold_after = 2
    engine = VllmEngine.load(vllm_settings([a.url]))
    engines.append(engine)

    turn = Collector()
    handle = engine.submit(EngineRequest(AUDIO, "chat"), turn)
    assert [turn.next().text, turn.next().text] == ["Hello", " world"]
    handle.cancel()
    final = turn.next()
    assert final.is_final  # nothing was handed out after cancel() returned
    totals = final.totals
    assert totals is not None and totals.status == "cancelled"
    assert totals.answer == "Hello world"
    assert totals.cancel_latency_ms is not None and totals.cancel_latency_ms >= 0
    assert totals.tokens_after_cancel == 0
    assert a.closed_early.wait(WAIT_S)  # the fake saw its stream closed: vLLM would abort
    assert engine.describe()["endpoints"][0]["in_flight"] == 0


def test_no_delta_for_delta_timeout_ends_the_turn_with_an_error(
    fakes: list[FakeVllm], engines: list[VllmEngine]
) -> None:
    a, _ = fakes
    a.hold_after = 1
    engine = VllmEngine.load(vllm_settings([a.url], delta_timeout_s=0.2, probe_interval_s=60))
    engines.append(engine)

    turn = Collector()
    engine.submit(EngineRequest(AUDIO, "chat"), turn)
    totals = turn.final().totals
    assert totals is not None and totals.status == "error"
    assert totals.error_code == "delta_timeout"
    assert totals.error is not None and a.url in totals.error
    assert "engine.vllm.delta_timeout_s" in totals.error
    assert totals.answer == "Hello"


def test_requests_carry_the_api_key_history_and_transcription_fields(
    fakes: list[FakeVllm], engines: list[VllmEngine]
) -> None:
    from voxtral_server.models.types import Message

    a, _ = fakes
    engine = VllmEngine.load(vllm_settings([a.url], api_key="test-key-123"))
    engines.append(engine)
    history = (
        Message("user", audio=speech_like(0.5, seed=1)),
        Message("assistant", "Earlier answer."),
    )
    chat = Collector()
    engine.submit(
        EngineRequest(AUDIO, "chat", instructions="Be brief.", history=history, temperature=0),
        chat,
    )
    assert chat.final().totals.status == "completed"  # type: ignore[union-attr]
    transcribe = Collector()
    engine.submit(EngineRequest(AUDIO, "transcribe", language="fr"), transcribe)
    assert transcribe.final().totals.status == "completed"  # type: ignore[union-attr]

    assert {r["auth"] for r in a.requests} == {"Bearer test-key-123"}
    models, chat_req, transcribe_req = a.requests
    body = chat_req["body"]
    assert body["model"] == "fake-model" and body["stream"] is True
    assert body["temperature"] == 0 and "top_p" not in body
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == "Earlier answer."
    last = body["messages"][2]["content"]
    assert [part["type"] for part in last] == ["input_audio", "text"]
    assert base64.b64decode(last[0]["input_audio"]["data"]) == wav_bytes(AUDIO)
    assert last[1]["text"] == "Be brief."
    form = transcribe_req["body"]
    assert transcribe_req["path"] == "/v1/audio/transcriptions"
    for name, value in (("stream", b"true"), ("language", b"fr"), ("model", b"fake-model")):
        assert b'name="%s"\r\n\r\n%s\r\n' % (name.encode(), value) in form


def test_close_cancels_turns_in_flight(fakes: list[FakeVllm]) -> None:
    a, _ = fakes
    a.hold_after = 1
    engine = VllmEngine.load(vllm_settings([a.url]))
    turn = Collector()
    engine.submit(EngineRequest(AUDIO, "chat"), turn)
    assert turn.next().text == "Hello"
    engine.close()
    engine.close()  # idempotent
    assert turn.final().totals.status == "cancelled"  # type: ignore[union-attr]
    with pytest.raises(EngineError) as refused:
        engine.submit(EngineRequest(AUDIO, "chat"), Collector())
    assert refused.value.code == "engine_closed"


def test_make_tiny_mistral_writes_what_vllm_reads_deterministically(tmp_path: Path) -> None:
    from voxtral_server.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        assert main(["make-tiny", "--format", "mistral", str(out), "--script", VLLM_SCRIPT]) == 0
    names = sorted(f.name for f in one.iterdir())
    assert names == ["consolidated.safetensors", "params.json", "tekken.json"]  # no config.json
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes()
    params = json.loads((one / "params.json").read_text())
    assert params["dim"] // params["n_heads"] == params["head_dim"] == 32  # CPU attention needs 32+


def test_make_tiny_mistral_refuses_a_script_it_cannot_say(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from voxtral_server.cli import main

    # "vLLM" splits into " v" "L" "L" "M": "L" would need two different successors.
    assert main(["make-tiny", "--format", "mistral", str(tmp_path / "m"), "--script", "vLLM"]) == 2
    assert "followed by both" in capsys.readouterr().err


# --------------------------------------------------------------------------- real vLLM

# A scripted answer that never ends (the tiny model's successor map loops): every answer is
# exactly model.max_new_tokens tokens, several words whatever the audio.
VLLM_SCRIPT = "Hello! This answer was streamed from a remote model server."
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    try:
        return ensure_vllm()
    except VllmUnavailable as exc:
        pytest.skip(f"vLLM is not available here: {exc}")


@pytest.fixture(scope="module")
def mistral_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mistral(
        tmp_path_factory.mktemp("tiny-mistral"), script=VLLM_SCRIPT, repeat=True
    )


@pytest.fixture(scope="module")
def replicas(
    vllm_python: Path, mistral_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[VllmServer]]:
    """Two vLLM servers on the tiny model, started together, always stopped at the end."""
    work = tmp_path_factory.mktemp("vllm-work")
    servers = [VllmServer(vllm_python, mistral_model, work / f"r{i}") for i in range(2)]
    try:
        for server in servers:
            server.work_dir.mkdir(parents=True, exist_ok=True)
            server.start()
        for server in servers:
            try:
                server.wait_ready()
            except VllmUnavailable as exc:  # vLLM is installed: not starting is a failure
                pytest.fail(f"the vLLM replicas did not start: {exc}", pytrace=False)
        yield servers
    finally:
        for server in servers:
            server.stop()


def server_settings(endpoints: list[str], max_tokens: int, **vllm: Any) -> Settings:
    data = vllm_settings(endpoints, **vllm).model_dump()
    data["model"]["max_new_tokens"] = max_tokens
    data["chat"]["temperature"] = 0.0  # greedy: the same request gives the same text
    return Settings.model_validate(data)


class Conversation:
    """A WebSocket session on our server, push-to-talk, one turn at a time."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, base_url: str, mode: str, language: str = "en") -> Conversation:
        ws = await websockets.connect(
            base_url.replace("http", "ws", 1) + "/v1/realtime", max_size=16 * 1024 * 1024
        )
        conv = cls(ws)
        await conv.until("session.created")
        session: dict[str, Any] = {
            "type": "realtime" if mode == "chat" else "transcription",
            "audio": {"input": {"turn_detection": None, "transcription": {"language": language}}},
        }
        await ws.send(session_update(session))
        await conv.until("session.updated")
        return conv

    async def until(self, type_: str, seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        while True:
            event = json.loads(await asyncio.wait_for(self.ws.recv(), WAIT_S))
            if seen is not None:
                seen.append(event)
            if event["type"] == type_:
                return event

    async def start_turn(self, audio: np.ndarray) -> None:
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        b64 = base64.b64encode(pcm).decode()
        await self.ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64}))
        await self.ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await self.ws.send(json.dumps({"type": "response.create"}))

    async def turn(self, audio: np.ndarray) -> tuple[str, dict[str, Any]]:
        """(the words received, response.done)."""
        seen: list[dict[str, Any]] = []
        await self.start_turn(audio)
        done = await self.until("response.done", seen)
        words = "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta")
        return words, done

    async def close(self) -> None:
        await self.ws.close()


def received_audio(audio: np.ndarray) -> np.ndarray:
    """What the server holds after our PCM16 appends (the same quantisation)."""
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768.0


def direct_chat(url: str, history: list[tuple[np.ndarray, str]], audio: np.ndarray) -> str:
    """Ask vLLM itself, not streaming, for the same chat turn."""

    def part(a: np.ndarray) -> dict[str, Any]:
        data = base64.b64encode(wav_bytes(a)).decode()
        return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}

    messages: list[dict[str, Any]] = []
    for past, answer in history:
        messages += [
            {"role": "user", "content": [part(past)]},
            {"role": "assistant", "content": answer},
        ]
    messages.append({"role": "user", "content": [part(audio)]})
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=WAIT_S)
    r.raise_for_status()
    text: str = r.json()["choices"][0]["message"]["content"]
    return text


def direct_transcription(url: str, audio: np.ndarray) -> str:
    files = {"file": ("a.wav", wav_bytes(audio), "audio/wav")}
    data = {
        "model": "tiny",
        "language": "en",
        "temperature": "0",
        "max_completion_tokens": str(MAX_TOKENS),
    }
    r = httpx.post(f"{url}/v1/audio/transcriptions", files=files, data=data, timeout=WAIT_S)
    r.raise_for_status()
    text: str = r.json()["text"]
    return text


async def readyz(base_url: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{base_url}/readyz", timeout=WAIT_S)
    return r.status_code, r.json()


@pytest.mark.asyncio
async def test_websocket_words_are_exactly_what_vllm_answers(
    replicas: list[VllmServer],
) -> None:
    a = replicas[0]
    settings = server_settings([a.url], MAX_TOKENS)
    with InProcessServer(create_app(settings)) as server:
        status, body = await readyz(server.base_url)
        assert status == 200 and body["engine"] == "vllm" and body["model"] == "tiny"

        first, second = speech_like(1.0, seed=1), speech_like(1.5, seed=2)
        chat = await Conversation.open(server.base_url, "chat")
        words1, done1 = await chat.turn(first)
        words2, done2 = await chat.turn(second)  # carries the first turn as history
        await chat.close()
        for done in (done1, done2):
            assert done["response"]["status"] == "completed"
            assert done["timings"]["model_ttft_ms"] is not None
        expected1 = direct_chat(a.url, [], received_audio(first))
        expected2 = direct_chat(a.url, [(received_audio(first), expected1)], received_audio(second))
        assert words1 == expected1 and words2 == expected2
        assert words1.startswith(VLLM_SCRIPT)  # a real multi-word answer, not an empty one

        transcribe = await Conversation.open(server.base_url, "transcribe")
        words, done = await transcribe.turn(first)
        await transcribe.close()
        assert done["response"]["status"] == "completed"
        assert words == direct_transcription(a.url, received_audio(first))
        assert words.startswith(VLLM_SCRIPT)


@pytest.mark.asyncio
async def test_a_killed_replica_fails_its_turn_and_is_used_again_once_back(
    replicas: list[VllmServer],
) -> None:
    settings = server_settings(
        [r.url for r in replicas],
        MAX_TOKENS,
        probe_interval_s=0.2,
        probe_max_interval_s=1.0,
        connect_timeout_s=2.0,
    )
    with InProcessServer(create_app(settings)) as server:
        conv = await Conversation.open(server.base_url, "chat")
        victim, other, done = await kill_a_replica_mid_turn(conv, server.base_url, replicas)
        assert done["response"]["status"] == "failed"
        error = done["response"]["status_details"]["error"]
        assert error["code"] == "endpoint_failed" and victim.url in error["message"]

        status, body = await readyz(server.base_url)
        assert status == 200  # the other replica still serves
        ups = {e["url"]: e["up"] for e in body["endpoints"]}
        assert ups == {victim.url: False, other.url: True}
        before = {e["url"]: e["turns"] for e in body["endpoints"]}

        for _ in range(2):
            words, done = await conv.turn(AUDIO)
            assert done["response"]["status"] == "completed", done
            assert words.startswith(VLLM_SCRIPT)
        _, body = await readyz(server.base_url)
        after = {e["url"]: e["turns"] for e in body["endpoints"]}
        assert after == {victim.url: before[victim.url], other.url: before[other.url] + 2}

        victim.start()  # the same port: the probe finds it again
        await asyncio.to_thread(victim.wait_ready)  # the WebSocket keeps answering pings
        await wait_until_up(server.base_url, victim.url)
        # Two turns at once: fewest in flight sends one to each replica.
        second = await Conversation.open(server.base_url, "chat")
        results = await asyncio.gather(conv.turn(AUDIO), second.turn(AUDIO))
        for words, done in results:
            assert done["response"]["status"] == "completed", done
            assert words.startswith(VLLM_SCRIPT)
        _, body = await readyz(server.base_url)
        final = {e["url"]: e["turns"] for e in body["endpoints"]}
        assert final == {victim.url: after[victim.url] + 1, other.url: after[other.url] + 1}
        await second.close()
        await conv.close()


async def kill_a_replica_mid_turn(
    conv: Conversation, base_url: str, replicas: list[VllmServer]
) -> tuple[VllmServer, VllmServer, dict[str, Any]]:
    """Start a turn and kill the replica it went to while it is in flight there.

    Returns (victim, other, the turn's response.done). Both replicas are stopped (SIGSTOP)
    before the turn starts: the tiny model answers in milliseconds, so only a stopped replica
    keeps the turn in flight long enough to see where /readyz says it went and kill that one.
    """
    seen: list[dict[str, Any]] = []
    for replica in replicas:
        replica.pause()
    try:
        await conv.start_turn(AUDIO)
        await conv.until("response.created", seen)  # submitted: in flight on one endpoint
        _, body = await readyz(base_url)
        (busy,) = [i for i, e in enumerate(body["endpoints"]) if e["in_flight"]]
        victim, other = replicas[busy], replicas[1 - busy]
        victim.kill()
    finally:
        for replica in replicas:
            replica.resume()
    return victim, other, await conv.until("response.done", seen)


async def wait_until_up(base_url: str, url: str) -> None:
    """Until /readyz shows `url` up: the probe runs on its own backoff, in another process's
    time (an external vLLM start-up), so this polls with a deadline."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    async with httpx.AsyncClient() as client:
        while asyncio.get_running_loop().time() < deadline:
            body = (await client.get(f"{base_url}/readyz")).json()
            if {e["url"]: e["up"] for e in body["endpoints"]}[url]:
                return
            await asyncio.sleep(0.1)
    pytest.fail(f"{url} not up in /readyz within {WAIT_S:g} s")
