"""vLLM's OpenAI-compatible wire format: the request for a turn and its streamed events."""

from __future__ import annotations

import json
from typing import Any

import httpx

from ...config import Settings
from ..audio import wav_bytes
from ..chat import chat_messages, offered_tools, openai_messages, openai_tool_choice, openai_tools
from ..chunking import DeltaChunker
from ..tools import ToolCallParts
from ..types import Request, sampling

ERROR_BODY_CHARS = 300  # of an error response quoted in the turn's error message


class TurnFailed(Exception):
    """A turn's stream failed; `endpoint_down` says whether the endpoint is to blame."""

    def __init__(self, code: str, message: str, endpoint_down: bool) -> None:
        super().__init__(message)
        self.code = code
        self.endpoint_down = endpoint_down


def build_request(
    client: httpx.AsyncClient, request: Request, url: str, model: str, settings: Settings
) -> httpx.Request:
    """The streaming HTTP request for one turn: a transcription or a chat completion."""
    max_tokens = request.max_new_tokens or settings.model.max_new_tokens
    temperature, top_p = sampling(request, settings.chat)
    if request.mode == "transcribe":
        assert request.audio is not None  # check_request
        data: dict[str, str] = {
            "model": model,
            "stream": "true",
            "stream_include_usage": "true",
            "stream_continuous_usage_stats": "true",
            "temperature": str(temperature),
            "max_completion_tokens": str(max_tokens),
        }
        if request.language:
            data["language"] = request.language
        if top_p is not None:
            data["top_p"] = str(top_p)
        files = {"file": ("audio.wav", wav_bytes(request.audio), "audio/wav")}
        return client.build_request(
            "POST", f"{url}/v1/audio/transcriptions", data=data, files=files
        )
    body: dict[str, Any] = {
        "model": model,
        "messages": openai_messages(chat_messages(request)),
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    if top_p is not None:
        body["top_p"] = top_p
    if request.min_new_tokens:
        body["min_tokens"] = request.min_new_tokens  # vLLM's extra sampling parameter
    tools = offered_tools(request)
    if tools:  # "auto" needs vLLM started with --enable-auto-tool-choice --tool-call-parser mistral
        body["tools"] = openai_tools(tools)
        body["tool_choice"] = openai_tool_choice(request)
    if request.seed is not None:
        body["seed"] = request.seed  # vLLM samples each request with its own generator too
    return client.build_request("POST", f"{url}/v1/chat/completions", json=body)


def parse_event(data: str, where: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        raise TurnFailed(
            "vllm_protocol", f"{where} sent an event that is not JSON: {data[:100]!r}", False
        ) from None
    if not isinstance(event, dict):
        raise TurnFailed("vllm_protocol", f"{where} sent {data[:100]!r}", False)
    if "error" in event:  # vLLM reports a failure inside the stream this way
        err = event["error"]
        message = err.get("message", err) if isinstance(err, dict) else err
        raise TurnFailed("vllm_error", f"{where} reported an error: {message}", False)
    return event


def feed(stream: DeltaChunker, event: dict[str, Any], now: float, calls: ToolCallParts) -> None:
    """One chat or transcription chunk: count its tokens, chunk its text, gather the parts of
    the function calls it carries (`delta.tool_calls`)."""
    text = ""
    called = False
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        text += delta.get("content") or ""
        for entry in delta.get("tool_calls") or ():
            if isinstance(entry, dict):
                calls.add(entry)
                called = True
        if choice.get("finish_reason") == "length":
            calls.cut_off = True
    usage = event.get("usage") or {}
    total = usage.get("completion_tokens")
    # Continuous usage stats give the exact running count; else one delta ~ one token.
    new_tokens = total - stream.tokens if isinstance(total, int) else int(bool(text) or called)
    if new_tokens > 0:
        stream.mark_tokens(new_tokens, now)  # the first one is the model's TTFT
    if text:
        stream.feed_text(text, now)


async def status_error(response: httpx.Response, where: str) -> TurnFailed:
    body = (await response.aread()).decode("utf-8", "replace")
    try:
        detail = json.loads(body).get("error", {}).get("message") or body
    except (ValueError, AttributeError):
        detail = body
    detail = str(detail)[:ERROR_BODY_CHARS]
    status = response.status_code
    if status in (401, 403):
        return TurnFailed(
            "vllm_unauthorized",
            f"{where} refused the request ({status}): check engine.vllm.api_key",
            False,
        )
    if status >= 500:
        return TurnFailed("endpoint_failed", f"{where} failed ({status}): {detail}", True)
    return TurnFailed("vllm_rejected", f"{where} rejected the request ({status}): {detail}", False)


def describe_http_error(exc: httpx.HTTPError) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
