"""`POST /v1/chat/completions` bodies: their typed shape, and the engine Request they make.

`request_from_messages` is the one place that maps OpenAI chat messages onto the engine's
conversation (text, audio, system messages, tool calls and their results), and refuses, by
name, what it cannot express.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..models.chat import chat_messages
from ..models.types import EngineError, Request, ToolCall
from ..models.types import Message as EngineMessage

MAX_MESSAGES = 256


class ChatRequestError(ValueError):
    """A chat request the server cannot serve (HTTP 400); `param` names the field."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class _Loose(BaseModel):
    # Unknown fields are ignored, as OpenAI's clients send many this server does not use.
    model_config = ConfigDict(extra="ignore")


class InputAudio(_Loose):
    data: str  # base64 of an audio file
    format: str = Field(default="wav", max_length=16)  # "wav" | "mp3" (any libsndfile reads)


class ContentPart(_Loose):
    type: str = Field(max_length=64)
    text: str | None = None
    input_audio: InputAudio | None = None


class Message(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Loose):
    include_usage: bool = False


class ChatCompletionRequest(_Loose):
    model: str | None = Field(default=None, max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    modalities: list[str] | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        """ChatRequestError naming the first parameter this server cannot honour."""
        if self.n != 1:
            raise ChatRequestError("unsupported_parameter", "n must be 1 (one answer)", "n")
        if self.tools or self.functions:
            raise ChatRequestError(
                "unsupported_parameter", "tools are not supported on this endpoint", "tools"
            )
        if self.modalities and any(m != "text" for m in self.modalities):
            raise ChatRequestError(
                "unsupported_parameter",
                f"modalities {self.modalities}: this endpoint answers in text only",
                "modalities",
            )
        if self.stop:
            raise ChatRequestError(
                "unsupported_parameter", "stop sequences are not supported", "stop"
            )
        if self.logprobs:
            raise ChatRequestError(
                "unsupported_parameter", "logprobs are not supported", "logprobs"
            )
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise ChatRequestError(
                "unsupported_parameter",
                f"response_format {kind!r} is not supported (only text)",
                "response_format",
            )

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


AudioDecoder = Callable[[bytes, str], np.ndarray]  # (file bytes, what) -> 16 kHz float32


def _texts(message: Message, where: str) -> list[str]:
    if isinstance(message.content, str):
        return [message.content]
    texts = []
    for i, part in enumerate(message.content or []):
        if part.type == "text":
            texts.append(part.text or "")
        elif part.type != "input_audio":
            raise ChatRequestError(
                "unsupported_content",
                f"{where}.content[{i}]: content part type {part.type!r} is not supported "
                "(text, input_audio)",
                "messages",
            )
    return texts


def _audio(message: Message, where: str, decode: AudioDecoder) -> np.ndarray | None:
    parts = [] if isinstance(message.content, str) else message.content or []
    audio = [(i, p) for i, p in enumerate(parts) if p.type == "input_audio"]
    if not audio:
        return None
    if len(audio) > 1:
        raise ChatRequestError(
            "unsupported_content", f"{where}: one input_audio part per message", "messages"
        )
    i, part = audio[0]
    field = f"{where}.content[{i}].input_audio"
    if part.input_audio is None:
        raise ChatRequestError("invalid_request", f"{field} is missing", "messages")
    try:
        data = binascii.a2b_base64(part.input_audio.data, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ChatRequestError(
            "invalid_audio", f"{field}.data is not valid base64", "messages"
        ) from None
    return decode(data, f"{field} ({part.input_audio.format})")


def request_from_messages(messages: list[Message], decode: AudioDecoder, max_turns: int) -> Request:
    """OpenAI chat messages -> the engine's Request (mode chat): the whole conversation.

    System (or developer) messages become system messages; user messages text and/or one
    audio part; assistant messages their text and tool calls; tool messages a function's
    output. At most `max_turns` user turns before the last; the conversation must end with
    the user's (or a tool's) message. Anything else is a ChatRequestError naming it. Audio
    is decoded by `decode` (CPU work: call this off the event loop).
    """
    history: list[EngineMessage] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        text = "\n".join(t for t in _texts(message, where) if t.strip())
        if message.role in ("system", "developer"):
            history.append(EngineMessage("system", text))
        elif message.role in ("tool", "function"):
            history.append(EngineMessage("tool", text, call_id=message.tool_call_id))
        elif message.role == "user":
            history.append(EngineMessage("user", text, _audio(message, where, decode)))
        else:
            calls = tuple(_tool_call(call, f"{where}.tool_calls[{j}]") for j, call in
                          enumerate(message.tool_calls or ()))  # fmt: skip
            history.append(EngineMessage("assistant", text, tool_calls=calls))
    users = sum(m.role == "user" for m in history)
    if users - 1 > max_turns:
        raise ChatRequestError(
            "too_many_turns",
            f"{users - 1} earlier exchanges; this server takes at most "
            f"conversation.max_turns = {max_turns}",
            "messages",
        )
    request = Request(None, "chat", history=tuple(history))
    try:
        chat_messages(request)
    except EngineError as exc:
        raise ChatRequestError("invalid_messages", str(exc), "messages") from None
    return request


def _tool_call(call: Any, where: str) -> ToolCall:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ChatRequestError(
            "invalid_request", f"{where}: a function call needs a name", "messages"
        )
    arguments = function.get("arguments", "{}")
    call_id = call.get("id")
    return ToolCall(
        call_id if isinstance(call_id, str) else "",
        function["name"],
        arguments if isinstance(arguments, str) else json.dumps(arguments),
    )
