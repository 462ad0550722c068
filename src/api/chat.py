"""`POST /v1/chat/completions` bodies: their typed shape, and the engine Request they make.

What the engine can answer today is one user turn with audio (and text sent with it),
after earlier (user audio, assistant text) exchanges, with instructions: `request_from_messages`
is the one place that maps OpenAI chat messages onto that, and refuses, by name, what it
cannot express yet. Widen it there when the engine's Request takes more.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..models.types import Request, Turn

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
    """OpenAI chat messages -> the engine's Request (mode chat).

    The last message must be the user's, with audio: the turn answered, its text sent as
    instructions. System (or developer) messages' text goes before that, in order. Earlier
    messages must be exchanges: a user message with audio (and no text), then the
    assistant's text answer; at most `max_turns` of them. Anything else is a
    ChatRequestError naming it. Audio is decoded by `decode` (CPU work: call this off the
    event loop).
    """
    system: list[str] = []
    turns: list[Turn] = []
    pending: np.ndarray | None = None  # an earlier user turn's audio, awaiting its answer
    last: tuple[np.ndarray | None, list[str]] | None = None
    final = max(
        (i for i, m in enumerate(messages) if m.role not in ("system", "developer")), default=-1
    )
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role in ("system", "developer"):
            system.extend(t for t in _texts(message, where) if t.strip())
        elif message.role in ("tool", "function") or message.tool_calls:
            raise ChatRequestError(
                "unsupported_content",
                f"{where}: tool calls and results are not supported",
                "messages",
            )
        elif message.role == "user":
            if pending is not None:
                raise ChatRequestError(
                    "unsupported_content",
                    f"{where}: two user messages in a row (each earlier one needs the "
                    "assistant's answer after it)",
                    "messages",
                )
            audio, texts = _audio(message, where, decode), _texts(message, where)
            if i == final:
                last = (audio, texts)
            elif audio is None or any(t.strip() for t in texts):
                raise ChatRequestError(
                    "unsupported_content",
                    f"{where}: an earlier user message must be audio only (text in earlier "
                    "user turns is not supported yet)",
                    "messages",
                )
            else:
                pending = audio
        else:  # assistant
            answer = " ".join(t for t in _texts(message, where) if t.strip())
            if pending is None or not answer:
                raise ChatRequestError(
                    "unsupported_content",
                    f"{where}: an assistant message must answer a user audio message, in text",
                    "messages",
                )
            turns.append(Turn(pending, answer))
            pending = None
    if last is None or last[0] is None:
        raise ChatRequestError(
            "missing_audio",
            "the last message must be the user's, with an input_audio part (text-only "
            "turns are not supported yet)",
            "messages",
        )
    audio = last[0]
    if len(turns) > max_turns:
        raise ChatRequestError(
            "too_many_turns",
            f"{len(turns)} earlier exchanges; this server takes at most "
            f"conversation.max_turns = {max_turns}",
            "messages",
        )
    texts = last[1]
    instructions = "\n\n".join([*system, *(t for t in texts if t.strip())]) or None
    return Request(audio, "chat", instructions=instructions, history=tuple(turns))
