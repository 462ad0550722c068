"""The REST endpoints OpenAI and vLLM clients use, on the same engine as the realtime sessions:
`POST /v1/audio/transcriptions` and `POST /v1/chat/completions` (audio in, text out), plain
JSON or server-sent events.

Each request is one `Engine.submit`, queued with every conversation's turns. Bodies are read
up to `server.max_request_bytes`; audio is decoded off the event loop; every refusal is an
OpenAI-style `{"error": {"message", "type", "code", "param"}}` with a fitting status. A
client that goes away stops its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ..models.audio import SAMPLE_RATE, AudioInputError, read_audio_bytes, validate
from ..models.engine import Engine
from ..models.languages import check_language
from ..models.types import Chunk, EngineError, RequestHandle, Totals
from ..models.types import Request as EngineRequest
from . import protocol as p
from .chat import AudioDecoder, ChatCompletionRequest, ChatRequestError, request_from_messages
from .metrics import quoted
from .security import bearer_token, origin_allowed, token_matches
from .state import ServerState

logger = logging.getLogger(__name__)
router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies: don't buffer
TRANSCRIPTION_FORMATS = ("json", "text")
_MAX_FORM_FIELDS = 32


class ApiError(Exception):
    """A request refused: HTTP `status` and the OpenAI-style error body."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "code": self.code,
                "param": self.param,
            }
        }

    def response(self) -> JSONResponse:
        logger.warning(
            "rest refused status=%d code=%s: %s", self.status, self.code, quoted(str(self))
        )
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ------------------------------------------------------------------ the engine, streamed


class EngineRun:
    """One request on the engine: its chunks, in order, on the event loop."""

    def __init__(self, engine: Engine, request: EngineRequest) -> None:
        loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue[Chunk] = asyncio.Queue()  # bounded by max_new_tokens
        self.finished = False

        def sink(chunk: Chunk) -> None:  # the engine's worker thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(self._chunks.put_nowait, chunk)

        try:
            self.handle: RequestHandle = engine.submit(request, sink)
        except AudioInputError as exc:  # audio the model cannot take (checked before, too)
            raise ApiError(400, exc.code, str(exc)) from None
        except EngineError as exc:  # busy, closing, no vLLM endpoint up: retry later
            status = 400 if exc.code == "invalid_mode" else 503
            raise ApiError(status, exc.code, str(exc)) from None

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Every chunk up to the final one (which carries the totals). Leaving early (the
        client went away) cancels the generation."""
        try:
            while not self.finished:
                chunk = await self._chunks.get()
                self.finished = chunk.is_final
                yield chunk
        finally:
            if not self.finished:
                self.handle.cancel()

    async def totals(self, request: Request) -> Totals:
        """Until the answer is complete (cancelled if the client disconnects meanwhile)."""
        watcher = asyncio.create_task(self._cancel_when_gone(request))
        totals: Totals | None = None
        try:
            async for chunk in self.chunks():
                totals = chunk.totals  # the final chunk's
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        assert totals is not None, "the engine's final chunk carries the totals"
        return totals

    async def _cancel_when_gone(self, request: Request) -> None:
        # The body has been read: the next message is the disconnect (or never comes).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.handle.cancel()


def _failed(totals: Totals) -> ApiError | None:
    if totals.status == "error":
        return ApiError(500, totals.error_code or "generation_failed", totals.error or "failed")
    return None


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def _stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


# ------------------------------------------------------------------ requests in


def _engine(request: Request) -> tuple[ServerState, Engine]:
    """The server's engine for a caller allowed to use it, or ApiError."""
    state: ServerState = request.app.state.server
    settings = state.settings
    if not origin_allowed(request.headers, settings):
        origin = request.headers.get("origin")
        raise ApiError(403, "forbidden_origin", f"origin {origin} is not allowed")
    if not token_matches(bearer_token(request.headers), settings):
        raise ApiError(401, "unauthorized", "missing or wrong auth token (Authorization: Bearer)")
    if state.engine is None:
        raise ApiError(503, "not_ready", "the model is still loading; retry shortly")
    return state, state.engine


def _limit(state: ServerState, request: Request) -> int:
    limit = state.settings.server.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, "request_too_large", f"body of {declared} bytes exceeds {_named(limit)}"
        )
    return limit


def _named(limit: int) -> str:
    return f"server.max_request_bytes = {limit}"


async def _body(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The body as it arrives; ApiError 413 once it passes `limit`."""
    seen = 0
    async for piece in request.stream():
        seen += len(piece)
        if seen > limit:
            raise ApiError(413, "request_too_large", f"body over {_named(limit)} bytes")
        yield piece


def _content_type(request: Request, expected: str) -> None:
    given = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if given != expected:
        raise ApiError(
            415, "unsupported_media_type", f"expected {expected}, got {given or 'nothing'}"
        )


def _field(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None or isinstance(value, str):
        return value
    raise ApiError(400, "invalid_request", f"{name} must be a text field, not a file", name)


def _flag(form: Any, name: str) -> bool:
    value = (_field(form, name) or "false").strip().lower()
    if value not in ("true", "false"):
        raise ApiError(400, "invalid_request", f"{name} must be true or false, got {value!r}", name)
    return value == "true"


def _number(form: Any, name: str, low: float, high: float) -> float | None:
    value = _field(form, name)
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not low <= number <= high:
        raise ApiError(
            400,
            "invalid_request",
            f"{name} must be a number from {low:g} to {high:g}, got {value!r}",
            name,
        )
    return number


def _reader(max_seconds: float) -> AudioDecoder:
    """Audio file bytes -> 16 kHz samples the model takes (audio.max_utterance_s), or
    AudioInputError. CPU work: run it off the event loop."""

    def read(data: bytes, what: str) -> np.ndarray:
        return validate(read_audio_bytes(data, what), max_seconds)

    return read


# ------------------------------------------------------------------ /v1/audio/transcriptions


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request) -> Response:
    """multipart: file (required), model, language, response_format (json | text),
    temperature, stream (true: `transcript.text.delta` / `transcript.text.done` events)."""
    try:
        return await _transcribe(request)
    except ApiError as exc:
        return exc.response()


async def _transcribe(request: Request) -> Response:
    state, engine = _engine(request)
    _content_type(request, "multipart/form-data")
    limit = _limit(state, request)
    parser = MultiPartParser(
        request.headers, _body(request, limit), max_files=1, max_fields=_MAX_FORM_FIELDS
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, "invalid_request", f"cannot read the form: {exc.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(
                400, "missing_file", "no audio file: send it as the form field 'file'", "file"
            )
        response_format = _field(form, "response_format") or "json"
        if response_format not in TRANSCRIPTION_FORMATS:
            raise ApiError(
                400,
                "unsupported_response_format",
                f"response_format {response_format!r} is not supported; use json or text",
                "response_format",
            )
        language = _field(form, "language") or None
        try:
            check_language(language)
        except ValueError as exc:
            raise ApiError(400, "invalid_language", str(exc), "language") from None
        stream = _flag(form, "stream")
        temperature = _number(form, "temperature", 0, 2)
        what = f"file {upload.filename or ''!r}"
        read = _reader(state.settings.audio.max_utterance_s)
        try:
            audio = await asyncio.to_thread(read, await upload.read(), what)
        except AudioInputError as exc:
            raise ApiError(400, exc.code, str(exc), "file") from None
    finally:
        await form.close()
    seconds = round(audio.size / SAMPLE_RATE, 3)
    engine_request = EngineRequest(
        audio, "transcribe", language=language, temperature=temperature, id=p.new_id("trs")
    )
    run = EngineRun(engine, engine_request)
    logger.info("transcription %s: %.2f s of audio, stream=%s", engine_request.id, seconds, stream)
    if stream:
        return _stream(_transcription_events(run, seconds))
    totals = await run.totals(request)
    error = _failed(totals)
    if error is not None:
        raise error
    if response_format == "text":
        return PlainTextResponse(totals.answer)
    return JSONResponse({"text": totals.answer, "usage": {"type": "duration", "seconds": seconds}})


async def _transcription_events(run: EngineRun, seconds: float) -> AsyncIterator[bytes]:
    async for chunk in run.chunks():
        if chunk.totals is None:
            yield sse({"type": "transcript.text.delta", "delta": chunk.text})
            continue
        error = _failed(chunk.totals)
        if error is not None:
            yield sse(error.body())
        else:
            yield sse({"type": "transcript.text.done", "text": chunk.totals.answer})


# ------------------------------------------------------------------ /v1/chat/completions


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """JSON: messages with `input_audio` (wav, mp3) and text parts; stream, max_tokens /
    max_completion_tokens, temperature, top_p."""
    try:
        return await _chat(request)
    except ApiError as exc:
        return exc.response()


async def _chat(request: Request) -> Response:
    state, engine = _engine(request)
    _content_type(request, "application/json")
    limit = _limit(state, request)
    raw = b"".join([piece async for piece in _body(request, limit)])
    try:
        body = ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as exc:
        code = "invalid_json" if exc.errors()[0]["type"] == "json_invalid" else "invalid_request"
        raise ApiError(400, code, _problems(exc)) from None
    settings = state.settings
    try:
        body.check_supported()
        engine_request = await asyncio.to_thread(
            request_from_messages,
            body.messages,
            _reader(settings.audio.max_utterance_s),
            settings.conversation.max_turns,
        )
    except ChatRequestError as exc:
        raise ApiError(400, exc.code, str(exc), exc.param) from None
    except AudioInputError as exc:
        raise ApiError(400, exc.code, str(exc), "messages") from None
    cap = settings.model.max_new_tokens
    max_tokens = min(body.token_limit or cap, cap)  # more than the server allows: its limit
    completion_id = f"chatcmpl-{p.new_id('')[1:]}"
    engine_request = replace(
        engine_request,
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        id=completion_id,
    )
    run = EngineRun(engine, engine_request)
    logger.info(
        "chat completion %s: %d earlier exchanges, stream=%s",
        completion_id,
        len(engine_request.history),
        body.stream,
    )
    head = {
        "id": completion_id,
        "created": int(time.time()),
        "model": body.model or settings.model.id,
    }
    if body.stream:
        return _stream(_chat_chunks(run, head, max_tokens))
    totals = await run.totals(request)
    error = _failed(totals)
    if error is not None:
        raise error
    message = {"role": "assistant", "content": totals.answer}
    choice = {
        "index": 0,
        "message": message,
        "finish_reason": _finish(totals, max_tokens),
        "logprobs": None,
    }
    return JSONResponse({**head, "object": "chat.completion", "choices": [choice]})


def _finish(totals: Totals, max_tokens: int) -> str:
    return "length" if totals.tokens >= max_tokens else "stop"


async def _chat_chunks(
    run: EngineRun, head: dict[str, Any], max_tokens: int
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    async for piece in run.chunks():
        if piece.totals is None:
            yield chunk({"content": piece.text})
            continue
        error = _failed(piece.totals)
        if error is not None:
            yield sse(error.body())
        else:
            yield chunk({}, _finish(piece.totals, max_tokens))
    yield sse("[DONE]")


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
    )
