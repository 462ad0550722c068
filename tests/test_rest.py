"""The REST endpoints with the stock `openai` SDK (and raw httpx for what it hides): audio
transcriptions and chat completions with audio, plain and streamed, on the real engine."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import SAMPLE_WAV, SCRIPT
from fakes import StubEngine
from openai import APIStatusError, OpenAI
from servers import InProcessServer, SharedEngine

from voxtral_server.api.app import create_app
from voxtral_server.config import Settings
from voxtral_server.models.audio import SAMPLE_RATE, read_audio_file
from voxtral_server.models.chunking import ChunkSink
from voxtral_server.models.types import Chunk, EngineError, Request, RequestHandle, Totals
from voxtral_server.models.voxtral import VoxtralEngine

SPEECH = read_audio_file(SAMPLE_WAV)  # ~4 s
WAV = SAMPLE_WAV.read_bytes()
MAX_REQUEST_BYTES = 400_000  # the sample clip fits (~130 KB, ~175 KB as base64 in JSON)
MAX_UTTERANCE_S = 5


def wav_of(audio: np.ndarray, fmt: str = "WAV") -> bytes:
    out = io.BytesIO()
    sf.write(out, audio, SAMPLE_RATE, format=fmt)
    return out.getvalue()


def audio_part(data: bytes = WAV, fmt: str = "wav") -> dict[str, Any]:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt},
    }


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


@pytest.fixture(scope="module")
def server(scripted_engine: VoxtralEngine) -> Iterator[InProcessServer]:
    settings = Settings().with_overrides(
        {
            ("server", "max_request_bytes"): MAX_REQUEST_BYTES,
            ("audio", "max_utterance_s"): MAX_UTTERANCE_S,
        }
    )
    app = create_app(settings, engine_factory=lambda s: SharedEngine(scripted_engine))
    with InProcessServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: InProcessServer) -> OpenAI:
    return OpenAI(api_key="unused-locally", base_url=f"{server.base_url}/v1", max_retries=0)


# ------------------------------------------------------------------ the SDK, as users call it


def test_transcription_with_the_openai_sdk(client: OpenAI) -> None:
    with SAMPLE_WAV.open("rb") as f:
        result = client.audio.transcriptions.create(model="voxtral", file=f)
    assert result.text == SCRIPT
    assert result.usage is not None and result.usage.type == "duration"
    assert result.usage.seconds == pytest.approx(SPEECH.size / SAMPLE_RATE, abs=0.01)
    with SAMPLE_WAV.open("rb") as f:
        text = client.audio.transcriptions.create(
            model="voxtral", file=f, response_format="text", language="en"
        )
    assert text == SCRIPT


def test_streamed_transcription_with_the_openai_sdk(client: OpenAI) -> None:
    with SAMPLE_WAV.open("rb") as f:
        events = list(client.audio.transcriptions.create(model="voxtral", file=f, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) == len(SCRIPT.split())  # one word each, as it is complete
    assert "".join(deltas) == SCRIPT
    assert events[-1].type == "transcript.text.done" and events[-1].text == SCRIPT


def test_chat_completion_with_audio_and_the_openai_sdk(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="voxtral",
        messages=[
            {"role": "system", "content": "Answer briefly."},
            user({"type": "text", "text": "What is said here?"}, audio_part()),  # type: ignore[arg-type]
        ],
        max_completion_tokens=200,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == SCRIPT
    assert choice.finish_reason == "stop"
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")


def test_streamed_chat_completion_with_the_openai_sdk(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="voxtral",
            messages=[user(audio_part())],
            stream=True,  # type: ignore[list-item]
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == SCRIPT
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_max_tokens_ends_the_answer_early(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="voxtral",
        messages=[user(audio_part(wav_of(SPEECH, "MP3"), "mp3"))],
        max_tokens=3,  # type: ignore[list-item]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content and SCRIPT.startswith(choice.message.content)
    assert len(choice.message.content) < len(SCRIPT)


def test_earlier_exchanges_are_the_history(client: OpenAI, server: InProcessServer) -> None:
    seen: list[Request] = []
    engine = server.state.engine
    submit = engine.submit

    def spy(request: Request, sink: ChunkSink) -> RequestHandle:
        seen.append(request)
        return submit(request, sink)

    engine.submit = spy
    try:
        client.chat.completions.create(
            model="voxtral",
            messages=[
                {"role": "system", "content": "Be brief."},
                user(audio_part()),  # type: ignore[list-item]
                {"role": "assistant", "content": "An earlier answer."},
                user({"type": "text", "text": "And now?"}, audio_part()),  # type: ignore[list-item]
            ],
        )
    finally:
        del engine.submit
    (request,) = seen
    assert request.mode == "chat" and request.audio is None  # the audio is in the history
    roles = [(m.role, m.text) for m in request.history]
    assert roles == [
        ("system", "Be brief."),
        ("user", ""),
        ("assistant", "An earlier answer."),
        ("user", "And now?"),
    ]
    sizes = [m.audio.size for m in request.history if m.audio is not None]
    assert sizes == [SPEECH.size, SPEECH.size]


def test_a_text_conversation_is_answered(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model="voxtral", messages=[{"role": "user", "content": "Hello?"}]
    )
    assert answer.choices[0].message.content == SCRIPT


# ------------------------------------------------------------------ raw HTTP: headers, errors


def test_streams_are_unbuffered_server_sent_events(server: InProcessServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with http.stream(
            "POST",
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", WAV)},
            data={"model": "voxtral", "stream": "true"},
        ) as reply:
            assert reply.headers["x-accel-buffering"] == "no"
            assert reply.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in reply.iter_lines() if line]
        assert all(line.startswith("data: ") for line in lines)
        reply = http.post(
            "/v1/chat/completions", json={"messages": [user(audio_part())], "stream": True}
        )
        assert reply.headers["x-accel-buffering"] == "no"
        assert reply.text.rstrip().endswith("data: [DONE]")


def error_of(reply: httpx.Response, status: int, code: str, *fragments: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert error["code"] == code, error
    assert set(error) >= {"message", "type", "code", "param"}
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


SHORT = wav_of(SPEECH[: SAMPLE_RATE // 2])
TOO_LONG = wav_of(np.zeros(int((MAX_UTTERANCE_S + 1) * SAMPLE_RATE), np.float32), "FLAC")
TRANSCRIPTION_ERRORS = {
    "no_file": (
        {"files": {"audio": ("a.wav", WAV)}, "data": {"model": "voxtral"}},
        400,
        "missing_file",
        ("'file'",),
    ),
    "not_audio": (
        {"files": {"file": ("notes.txt", b"not audio at all" * 10)}},
        400,
        "unreadable_audio",
        ("'notes.txt'", "cannot decode"),
    ),
    "empty": ({"files": {"file": ("a.wav", b"")}}, 400, "empty_audio", ("'a.wav'",)),
    "too_long": (
        {"files": {"file": ("a.flac", TOO_LONG)}},
        400,
        "audio_too_long",
        ("6.0 s", "audio.max_utterance_s = 5"),
    ),
    "srt": (
        {"files": {"file": ("a.wav", WAV)}, "data": {"response_format": "srt"}},
        400,
        "unsupported_response_format",
        ("'srt'", "json or text"),
    ),
    "language": (
        {"files": {"file": ("a.wav", WAV)}, "data": {"language": "zz"}},
        400,
        "invalid_language",
        ("'zz'",),
    ),
    "stream_flag": (
        {"files": {"file": ("a.wav", WAV)}, "data": {"stream": "maybe"}},
        400,
        "invalid_request",
        ("stream",),
    ),
    "temperature": (
        {"files": {"file": ("a.wav", WAV)}, "data": {"temperature": "hot"}},
        400,
        "invalid_request",
        ("temperature",),
    ),
    "too_large": (
        {"files": {"file": ("a.wav", b"\0" * (MAX_REQUEST_BYTES + 1))}},
        413,
        "request_too_large",
        ("server.max_request_bytes = 400000",),
    ),
    "not_multipart": (
        {"json": {"file": "a.wav"}},
        415,
        "unsupported_media_type",
        ("multipart/form-data",),
    ),
}


@pytest.mark.parametrize("case", list(TRANSCRIPTION_ERRORS))
def test_transcription_refusals_say_why(server: InProcessServer, case: str) -> None:
    kwargs, status, code, fragments = TRANSCRIPTION_ERRORS[case]
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        error_of(http.post("/v1/audio/transcriptions", **kwargs), status, code, *fragments)
        # The server goes on serving.
        ok = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", WAV)})
        assert ok.json()["text"] == SCRIPT


CHAT_ERRORS: dict[str, tuple[Any, int, str, tuple[str, ...]]] = {
    "not_json": (b"{nope", 400, "invalid_json", ()),
    "no_messages": ({"messages": []}, 400, "invalid_request", ("messages",)),
    "bad_base64": (
        {"messages": [user({"type": "input_audio", "input_audio": {"data": "***"}})]},
        400,
        "invalid_audio",
        ("base64",),
    ),
    "not_audio": (
        {"messages": [user(audio_part(b"garbage" * 20))]},
        400,
        "unreadable_audio",
        ("messages[0].content[0].input_audio (wav)",),
    ),
    "image": (
        {"messages": [user({"type": "image_url", "image_url": {"url": "x"}}, audio_part())]},
        400,
        "unsupported_content",
        ("'image_url'",),
    ),
    "tools": (
        {"messages": [user(audio_part())], "tools": [{"type": "function"}]},
        400,
        "unsupported_parameter",
        ("tools",),
    ),
    "n": (
        {"messages": [user(audio_part())], "n": 2},
        400,
        "unsupported_parameter",
        ("n must be 1",),
    ),
    "temperature": (
        {"messages": [user(audio_part())], "temperature": 3},
        400,
        "invalid_request",
        ("temperature",),
    ),
    "too_many_turns": (
        {
            "messages": [
                *[
                    m
                    for _ in range(5)
                    for m in (user(audio_part(SHORT)), {"role": "assistant", "content": "ok"})
                ],
                user(audio_part()),
            ]
        },
        400,
        "too_many_turns",
        ("conversation.max_turns = 4",),
    ),
    "too_long": (
        {"messages": [user(audio_part(TOO_LONG, "flac"))]},
        400,
        "audio_too_long",
        ("audio.max_utterance_s = 5",),
    ),
}


@pytest.mark.parametrize("case", list(CHAT_ERRORS))
def test_chat_refusals_say_why(server: InProcessServer, case: str) -> None:
    body, status, code, fragments = CHAT_ERRORS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        reply = http.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
        error_of(reply, status, code, *fragments)


def test_a_chat_body_over_the_limit_is_refused(server: InProcessServer) -> None:
    big = {"messages": [user(audio_part(b"\0" * MAX_REQUEST_BYTES))]}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        error_of(http.post("/v1/chat/completions", json=big), 413, "request_too_large")
        wrong = http.post(
            "/v1/chat/completions", content=b"x", headers={"content-type": "text/plain"}
        )
        error_of(wrong, 415, "unsupported_media_type", "application/json")


def test_a_chunked_body_is_cut_off_at_the_limit(server: InProcessServer) -> None:
    """No Content-Length to refuse up front: the body is counted as it arrives."""
    big = b"\0" * (MAX_REQUEST_BYTES + 1)
    form = httpx.Request("POST", "/", files={"file": ("a.wav", big)})
    multipart = form.read()
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        reply = http.post(
            "/v1/audio/transcriptions",
            content=iter([multipart]),  # an iterator: sent chunked
            headers={"content-type": form.headers["content-type"]},
        )
        error_of(reply, 413, "request_too_large", "server.max_request_bytes = 400000")
        body = json.dumps({"messages": [user(audio_part(big))]}).encode()
        reply = http.post(
            "/v1/chat/completions",
            content=iter([body]),
            headers={"content-type": "application/json"},
        )
        error_of(reply, 413, "request_too_large")


def test_the_sdk_sees_an_openai_style_error(client: OpenAI) -> None:
    with pytest.raises(APIStatusError) as refused, SAMPLE_WAV.open("rb") as f:
        client.audio.transcriptions.create(model="voxtral", file=f, response_format="srt")
    assert refused.value.status_code == 400
    assert (
        isinstance(refused.value.body, dict)
        and refused.value.body["code"] == "unsupported_response_format"
    )


# ------------------------------------------------------------------ the engine's state


class BusyEngine(StubEngine):
    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        raise EngineError("engine_busy", "16 requests are already waiting (engine.queue_size)")


class SlowEngine(StubEngine):
    """Says one word, then nothing until the request is cancelled: then ends 'cancelled'."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.status: str | None = None

    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        handle = RequestHandle(request)

        def run() -> None:
            sink(Chunk("Hello", 0, False, 1.0, 1.0, 1))
            handle._cancel.wait(60)
            self.status = "cancelled" if handle.cancelled else "completed"
            totals = Totals(self.status, "Hello", 1, 1, 1.0, 1.0, 0.0, 1.0)  # type: ignore[arg-type]
            sink(Chunk("", 1, True, 1.0, 1.0, 1, totals))
            self.ended.set()

        threading.Thread(target=run, daemon=True).start()
        return handle


def test_a_busy_engine_is_a_503_to_retry(tmp_path: Any) -> None:
    app = create_app(Settings(), engine_factory=lambda s: BusyEngine())
    with InProcessServer(app) as server, httpx.Client(base_url=server.base_url) as http:
        reply = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", WAV)})
        error_of(reply, 503, "engine_busy", "engine.queue_size")
        assert reply.headers["retry-after"] == "1"


def test_before_the_model_has_loaded_it_is_a_503() -> None:
    loaded = threading.Event()

    def slow_load(settings: Settings) -> StubEngine:
        loaded.wait(60)
        return StubEngine()

    server = InProcessServer(create_app(Settings(), engine_factory=slow_load)).start(
        wait_loaded=False
    )
    try:
        with httpx.Client(base_url=server.base_url) as http:
            reply = http.post("/v1/chat/completions", json={"messages": [user(audio_part())]})
            error_of(reply, 503, "not_ready", "loading")
    finally:
        loaded.set()
        server.stop()


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
def test_a_client_that_leaves_stops_its_generation(stream: bool) -> None:
    engine = SlowEngine()  # never ends unless cancelled
    app = create_app(Settings(), engine_factory=lambda s: engine)
    body = {"messages": [user(audio_part())], "stream": stream}
    with InProcessServer(app) as server, httpx.Client(base_url=server.base_url) as http:
        if stream:
            with http.stream("POST", "/v1/chat/completions", json=body, timeout=60) as reply:
                for line in reply.iter_lines():
                    if '"Hello"' in line:
                        break  # the first word arrived: hang up
        else:
            # The answer never comes: the client gives up waiting and hangs up.
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1))
        assert engine.ended.wait(60)
        assert engine.status == "cancelled"


def test_a_token_is_needed_when_the_server_has_one(scripted_engine: VoxtralEngine) -> None:
    settings = Settings().with_overrides({("server", "auth_token"): "s3cret-token-0123456789"})
    app = create_app(settings, engine_factory=lambda s: SharedEngine(scripted_engine))
    with InProcessServer(app) as server:
        anonymous = OpenAI(api_key="wrong", base_url=f"{server.base_url}/v1", max_retries=0)
        with pytest.raises(APIStatusError) as refused, SAMPLE_WAV.open("rb") as f:
            anonymous.audio.transcriptions.create(model="voxtral", file=f)
        assert refused.value.status_code == 401
        trusted = OpenAI(api_key="s3cret-token-0123456789", base_url=f"{server.base_url}/v1")
        with SAMPLE_WAV.open("rb") as f:
            assert trusted.audio.transcriptions.create(model="voxtral", file=f).text == SCRIPT
