"""What callers hand the engine and what comes back: plain data, no tensors."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from ..config import SamplingSettings

Mode = Literal["transcribe", "chat"]
Status = Literal["completed", "cancelled", "error"]


def ms_between(start: float, end: float) -> float:
    """Milliseconds between two `time.perf_counter()` readings, to the microsecond."""
    return round((end - start) * 1000.0, 3)


class EngineError(RuntimeError):
    """A request could not be served; `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ModelLoadError(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("model_load_failed", message)


Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolCall:
    """A function the model asked to call: its arguments as JSON text."""

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Tool:
    """A function the model may call (`parameters`: its JSON schema)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Message:
    """One entry of a chat's history: what someone said, in text and/or audio.

    user: `audio` (16 kHz mono float32) and/or `text`; assistant: `text` and/or
    `tool_calls`; tool: `text` is the output of the call `call_id`; system: `text`.
    """

    role: Role
    text: str = ""
    audio: np.ndarray | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    call_id: str | None = None


@dataclass(frozen=True, eq=False)  # audio arrays have no plain ==
class Request:
    # 16 kHz mono float32: what to transcribe, or the user's new utterance in chat mode
    # (None in chat mode: answer the history as it stands; its last message is the user's
    # or a tool's).
    audio: np.ndarray | None
    mode: Mode = "chat"
    language: str | None = None  # transcribe mode; None = let the model detect it
    instructions: str | None = None  # chat mode: text sent along with the newest user turn
    history: tuple[Message, ...] = ()  # chat mode: the conversation so far, oldest first
    tools: tuple[Tool, ...] = ()  # chat mode: functions the model may call
    tool_choice: str = "auto"  # "auto", "none", "required", or a tool's name
    max_new_tokens: int | None = None  # None = model.max_new_tokens
    temperature: float | None = None  # None = chat.temperature (chat) / 0 (transcribe)
    top_p: float | None = None
    # Sampling only: the answer's random generator starts from this seed, so the same request
    # gets the same answer whoever else the engine serves at the time. None = a fresh seed.
    seed: int | None = None
    min_new_tokens: int = 0  # benchmarks: keep a random model from stopping at once
    # Started before the turn is confirmed (the speaker paused): served after every confirmed
    # request and stopped for one, until `Engine.promote` makes it an ordinary request.
    speculative: bool = False
    # Named in every engine log line about this request (the server passes its response id).
    id: str = field(default_factory=lambda: f"req_{secrets.token_hex(6)}")


def sampling(request: Request, chat: SamplingSettings) -> tuple[float, float | None]:
    """(temperature, top_p), or (0, None) for greedy decoding: the request's own values,
    else `chat.*` in chat mode; transcription is greedy unless the request says otherwise.
    Every engine decodes by this rule."""
    if request.temperature is not None:
        temperature = request.temperature
    else:
        temperature = chat.temperature if request.mode == "chat" else 0.0
    if temperature <= 0:
        return 0.0, None
    return temperature, request.top_p if request.top_p is not None else chat.top_p


@dataclass(frozen=True)
class Totals:
    """Carried by the final chunk of an answer."""

    status: Status
    answer: str  # the whole answer's text
    tokens: int
    words: int
    total_ms: float
    tokens_per_s: float
    queue_wait_ms: float
    model_ttft_ms: float | None  # worker picked the request up -> first generated token
    cancel_latency_ms: float | None = None  # cancel() -> generation stopped
    tokens_after_cancel: int | None = None  # generated after cancel() was called
    error_code: str | None = None
    error: str | None = None
    token_ids: tuple[int, ...] = ()  # every generated token, EOS included
    # The functions the model called, in order (status "completed"; `answer` is then the
    # text it said before the call, usually ""). Empty when it answered in words.
    tool_calls: tuple[ToolCall, ...] = ()
    prompt_tokens: int | None = None  # tokens the model read (when the engine knows)


@dataclass(frozen=True)
class Chunk:
    """One delta of an answer. Concatenating the texts of all chunks gives the answer."""

    text: str
    chunk_index: int
    is_final: bool
    first_token_latency_ms: float | None  # submitted -> first generated token
    processing_time_ms: float  # submitted -> this chunk handed out
    tokens: int  # tokens generated so far
    totals: Totals | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        totals = data.pop("totals")
        if totals is not None:
            data.update(totals)
        return data


@dataclass(eq=False)
class RequestHandle:
    """The caller's side of a submitted request: cancel it, read its timestamps."""

    request: Request
    submitted_at: float = field(default_factory=time.perf_counter)
    _cancel: threading.Event = field(default_factory=threading.Event)
    cancel_requested_at: float | None = None
    tokens: int = 0  # generated so far; written by the worker, read by cancel()
    tokens_at_cancel: int | None = None
    speculative: bool = False  # still speculative (the engine sets it; `promote` clears it)
    preempted: bool = False  # cancelled by the engine for a confirmed request

    def __post_init__(self) -> None:
        self.speculative = self.request.speculative

    def cancel(self) -> None:
        """Stop generation at the next decode step (idempotent, from any thread)."""
        if not self._cancel.is_set():
            self.cancel_requested_at = time.perf_counter()
            self.tokens_at_cancel = self.tokens
            self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()
