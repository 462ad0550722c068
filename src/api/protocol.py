"""The wire protocol: a subset of the OpenAI Realtime API (GA) events, typed.

One module for both transports (WebSocket text frames, the WebRTC `oai-events` data channel).
Client events are parsed strictly by `type`; unknown fields inside a known event are ignored,
as the OpenAI API's own clients send fields this server does not use (voice, tools, ...).
Server events carry the standard fields plus a few extras the browser UI uses
(`chunk_index`, `is_final`, `first_token_latency_ms`, `processing_time_ms`, `timings`);
standard clients ignore them.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from ..models.languages import check_language


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore")
    event_id: str | None = None


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------ client -> server


class TurnDetection(_Loose):
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float | None = Field(default=None, gt=0, lt=1)
    prefix_padding_ms: int | None = Field(default=None, ge=0, le=5000)
    silence_duration_ms: int | None = Field(default=None, ge=32, le=10_000)
    # semantic_vad: how soon a turn that does not sound finished is ended anyway.
    eagerness: Literal["low", "medium", "high", "auto"] | None = None
    create_response: bool = True
    interrupt_response: bool = True

    @model_validator(mode="after")
    def _eagerness_is_semantic(self) -> TurnDetection:
        if self.eagerness is not None and self.type != "semantic_vad":
            raise ValueError(
                f"eagerness applies to turn_detection.type semantic_vad, not {self.type}"
            )
        return self


class Transcription(_Loose):
    # Any model name: the user's words are always written down by Voxtral itself.
    model: str | None = Field(default=None, max_length=200)
    language: Annotated[str | None, AfterValidator(check_language)] = Field(
        default=None, pattern=r"^[a-z]{2}$"
    )


class AudioFormatConfig(_Loose):
    """`{"type": "audio/pcm", "rate": 24000}`, `{"type": "audio/pcmu"}`, ...: checked by
    `audio_formats.audio_format`, which names what is not supported."""

    type: str | None = Field(default=None, max_length=64)
    rate: int | None = None


class AudioInput(_Loose):
    format: AudioFormatConfig | None = None
    # A present `turn_detection: null` means push-to-talk; an absent key means "unchanged".
    turn_detection: TurnDetection | None = None
    # A present `transcription: null` turns the user's captions off.
    transcription: Transcription | None = None


class AudioOutput(_Loose):
    format: AudioFormatConfig | None = None


class AudioConfig(_Loose):
    input: AudioInput | None = None
    output: AudioOutput | None = None


MAX_TOOLS = 64


class ToolParam(_Loose):
    type: Literal["function"] = "function"
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str = Field(default="", max_length=4000)
    parameters: dict[str, Any] = Field(default_factory=dict)


class ToolChoiceFunction(_Loose):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


ToolChoice = Literal["auto", "none", "required"] | ToolChoiceFunction
Modalities = list[Literal["text", "audio"]]


class VoxtralOptions(_Loose):
    """Extension (`session.voxtral`): what this server can send beyond OpenAI's events."""

    # `voxtral.output_audio.spoken` {response_id, item_id, delta}: the words of a phrase
    # whose audio has just started (the page marks the words being spoken).
    spoken_events: bool = False


class SessionConfig(_Loose):
    # "realtime" answers what was said (chat); "transcription" writes it down.
    type: Literal["realtime", "transcription"] | None = None
    instructions: str | None = Field(default=None, max_length=4000)
    audio: AudioConfig | None = None
    output_modalities: Modalities | None = Field(default=None, min_length=1, max_length=1)
    tools: list[ToolParam] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    max_output_tokens: int | Literal["inf"] | None = Field(default=None)
    voxtral: VoxtralOptions | None = None

    @model_validator(mode="after")
    def _max_tokens(self) -> SessionConfig:
        _check_max_tokens(self.max_output_tokens)
        return self


def _check_max_tokens(value: int | str | None) -> None:
    if isinstance(value, int) and not 1 <= value <= 4096:
        raise ValueError("max_output_tokens must be between 1 and 4096, or 'inf'")


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: SessionConfig


class InputAudioBufferAppend(_Event):
    type: Literal["input_audio_buffer.append"]
    audio: str  # base64, in the session's audio.input.format (audio_formats.py)


class InputAudioBufferCommit(_Event):
    type: Literal["input_audio_buffer.commit"]


class InputAudioBufferClear(_Event):
    type: Literal["input_audio_buffer.clear"]


class ContentPartParam(_Loose):
    type: str = Field(max_length=40)
    text: str | None = None
    audio: str | None = None  # base64, in the session's input audio format
    transcript: str | None = None


class ItemParam(_Loose):
    """A conversation item as a client sends it (OpenAI's `ConversationItem`)."""

    type: Literal["message", "function_call", "function_call_output", "item_reference"]
    id: str | None = Field(default=None, min_length=1)
    role: Literal["user", "assistant", "system"] | None = None
    content: list[ContentPartParam] | None = Field(default=None, max_length=64)
    call_id: str | None = Field(default=None, max_length=64)
    name: str | None = Field(default=None, max_length=64)
    arguments: str | None = None
    output: str = ""


class ConversationItemCreate(_Event):
    type: Literal["conversation.item.create"]
    previous_item_id: str | None = None
    item: ItemParam


class ConversationItemRetrieve(_Event):
    type: Literal["conversation.item.retrieve"]
    item_id: str


class ConversationItemDelete(_Event):
    type: Literal["conversation.item.delete"]
    item_id: str


class ConversationItemTruncate(_Event):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = Field(default=0, ge=0)
    audio_end_ms: int = Field(ge=0)


class ResponseParams(_Loose):
    """response.create's `response`: this answer's own settings (absent: the session's)."""

    instructions: str | None = Field(default=None, max_length=4000)
    output_modalities: Modalities | None = Field(default=None, min_length=1, max_length=1)
    max_output_tokens: int | Literal["inf"] | None = None
    # "none": an out-of-band answer, kept out of the conversation.
    conversation: Literal["auto", "none"] = "auto"
    # Its own context instead of the conversation (items, or {"type": "item_reference"}).
    input: list[ItemParam] | None = Field(default=None, max_length=256)
    tools: list[ToolParam] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)

    @model_validator(mode="after")
    def _max_tokens(self) -> ResponseParams:
        _check_max_tokens(self.max_output_tokens)
        return self


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: ResponseParams | None = None


class ResponseCancel(_Event):
    type: Literal["response.cancel"]
    response_id: str | None = None


class OutputAudioBufferClear(_Event):
    type: Literal["output_audio_buffer.clear"]


class ClientTiming(_Event):
    """Extension: what the user saw, measured by the page (browser clock)."""

    type: Literal["voxtral.client_timing"]
    response_id: str = Field(max_length=64)
    first_word_ms: float | None = Field(default=None, ge=0, le=600_000)
    first_audio_ms: float | None = Field(default=None, ge=0, le=600_000)  # first audio played


class ClientFallback(_Event):
    """Extension: the page fell back from WebRTC to this WebSocket, and why."""

    type: Literal["voxtral.fallback"]
    reason: str = Field(max_length=300)


ClientEvent = Annotated[
    SessionUpdate
    | InputAudioBufferAppend
    | InputAudioBufferCommit
    | InputAudioBufferClear
    | ResponseCreate
    | ResponseCancel
    | ConversationItemCreate
    | ConversationItemRetrieve
    | ConversationItemDelete
    | ConversationItemTruncate
    | OutputAudioBufferClear
    | ClientTiming
    | ClientFallback,
    Field(discriminator="type"),
]
CLIENT_EVENT_TYPES = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "response.create",
    "response.cancel",
    "conversation.item.create",
    "conversation.item.retrieve",
    "conversation.item.delete",
    "conversation.item.truncate",
    "output_audio_buffer.clear",
    "voxtral.client_timing",
    "voxtral.fallback",
)
_client_adapter: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)


class ProtocolError(ValueError):
    """A client event that cannot be used; `code` goes into the `error` event."""

    def __init__(self, code: str, message: str, event_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.event_id = event_id


def parse_client_event(raw: str | bytes) -> ClientEvent:
    """JSON text -> a typed client event, or `ProtocolError` naming what is wrong."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ProtocolError("invalid_json", "event is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise ProtocolError("invalid_json", f"event is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_event", "event must be a JSON object")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_event", "event has no string 'type'", event_id)
    if kind not in CLIENT_EVENT_TYPES:
        raise ProtocolError(
            "unknown_event",
            f"unsupported event type {kind!r}; supported: {', '.join(CLIENT_EVENT_TYPES)}",
            event_id,
        )
    try:
        return _client_adapter.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'event'}: {e['msg']}" for e in exc.errors()
        )
        raise ProtocolError("invalid_event", f"invalid {kind}: {problems}", event_id) from None


# ------------------------------------------------------------------ server -> client


def new_id(prefix: str) -> str:
    """A fresh id such as `item_3f2a9c41d07b` (random: no counter shared by sessions)."""
    return f"{prefix}_{secrets.token_hex(6)}"


class ServerEvent(BaseModel):
    event_id: str = Field(default_factory=lambda: new_id("event"))

    def to_json(self) -> str:
        try:
            return self.model_dump_json(exclude_none=True)
        except ValueError:
            # A client's own text echoed back (an event_id) may hold a lone surrogate, which
            # UTF-8 cannot carry; JSON can, escaped: the error still reaches the client.
            return json.dumps(self.model_dump(exclude_none=True))


class Transport(Protocol):
    """What carries a session's events to its client (WebSocket, WebRTC data channel)."""

    name: str

    def send(self, event: ServerEvent) -> None:
        """Queue an event for the client; never blocks, never raises."""


class SessionState(BaseModel):
    """What the session currently does, echoed in session.created / session.updated."""

    id: str
    type: Literal["realtime", "transcription"]
    object: Literal["realtime.session"] = "realtime.session"
    model: str
    instructions: str | None = None
    output_modalities: list[str] | None = None
    audio: dict[str, Any]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: int | Literal["inf"] | None = None


class SessionCreated(ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: SessionState


class SessionUpdated(ServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: SessionState


class SpeechStarted(ServerEvent):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


class SpeechStopped(ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    # Beyond OpenAI's event: ms between the last speech sample's arrival at the server and
    # this event (the silence waited and the judging), so a client can place the end of
    # speech on its own clock: now - since_speech_end_ms.
    since_speech_end_ms: float | None = None
    item_id: str


class Committed(ServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None = None


class Cleared(ServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class Response(BaseModel):
    id: str
    object: Literal["realtime.response"] = "realtime.response"
    status: Literal["in_progress", "completed", "cancelled", "failed", "incomplete"]
    status_details: dict[str, Any] | None = None
    output: list[dict[str, Any]] = Field(default_factory=list)
    # None for an out-of-band answer (response.create with conversation "none").
    conversation_id: str | None = None
    output_modalities: list[str] | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    metadata: dict[str, str] | None = None
    usage: dict[str, Any] | None = None


class ResponseCreated(ServerEvent):
    type: Literal["response.created"] = "response.created"
    response: Response


class ErrorDetail(BaseModel):
    type: str = "invalid_request_error"
    code: str
    message: str
    event_id: str | None = None


class ItemAdded(ServerEvent):
    type: Literal["conversation.item.added"] = "conversation.item.added"
    previous_item_id: str | None = None
    item: dict[str, Any]


class ItemDone(ServerEvent):
    type: Literal["conversation.item.done"] = "conversation.item.done"
    previous_item_id: str | None = None
    item: dict[str, Any]


class ItemRetrieved(ServerEvent):
    type: Literal["conversation.item.retrieved"] = "conversation.item.retrieved"
    item: dict[str, Any]


class ItemTruncated(ServerEvent):
    type: Literal["conversation.item.truncated"] = "conversation.item.truncated"
    item_id: str
    content_index: int = 0
    audio_end_ms: int


class InputTranscriptionDelta(ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.delta"] = (
        "conversation.item.input_audio_transcription.delta"
    )
    item_id: str
    content_index: int = 0
    delta: str


class InputTranscriptionCompleted(ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.completed"] = (
        "conversation.item.input_audio_transcription.completed"
    )
    item_id: str
    content_index: int = 0
    transcript: str
    usage: dict[str, Any]
    timings: Timings | None = None  # extension, as in response.done


class InputTranscriptionFailed(ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.failed"] = (
        "conversation.item.input_audio_transcription.failed"
    )
    item_id: str
    content_index: int = 0
    error: ErrorDetail


class OutputItemAdded(ServerEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    response_id: str
    output_index: int
    item: dict[str, Any]


class OutputItemDone(ServerEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    response_id: str
    output_index: int
    item: dict[str, Any]


class _ContentEvent(ServerEvent):
    """An event about one content part of a response's output item."""

    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0


class ContentPartAdded(_ContentEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    part: dict[str, Any]


class ContentPartDone(_ContentEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    part: dict[str, Any]


class FunctionCallArgumentsDelta(ServerEvent):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    delta: str


class FunctionCallArgumentsDone(ServerEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: str


class TextDelta(_ContentEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str
    # Extras for the browser UI.
    chunk_index: int
    is_final: bool = False
    first_token_latency_ms: float | None
    processing_time_ms: float


class TextDone(_ContentEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str


class AudioDelta(_ContentEvent):
    """Speech for the WebSocket: base64 audio in the session's audio.output.format."""

    type: Literal["response.output_audio.delta"] = "response.output_audio.delta"
    delta: str


class AudioDone(_ContentEvent):
    type: Literal["response.output_audio.done"] = "response.output_audio.done"


class TranscriptDelta(_ContentEvent):
    """An audio answer's words, each the moment it is complete (its audio follows)."""

    type: Literal["response.output_audio_transcript.delta"] = (
        "response.output_audio_transcript.delta"
    )
    delta: str
    # Extras for the browser UI, as on response.output_text.delta.
    chunk_index: int | None = None
    first_token_latency_ms: float | None = None
    processing_time_ms: float | None = None


class Spoken(ServerEvent):
    """Extension (opt-in: `session.voxtral.spoken_events`): a phrase whose audio has just
    started, on either transport: the words being spoken now."""

    type: Literal["voxtral.output_audio.spoken"] = "voxtral.output_audio.spoken"
    response_id: str
    item_id: str
    delta: str


class TranscriptDone(_ContentEvent):
    type: Literal["response.output_audio_transcript.done"] = "response.output_audio_transcript.done"
    transcript: str


# WebRTC only, as in OpenAI's API: the call's audio track playing a response's audio.
class OutputAudioBufferStarted(ServerEvent):
    type: Literal["output_audio_buffer.started"] = "output_audio_buffer.started"
    response_id: str


class OutputAudioBufferStopped(ServerEvent):
    type: Literal["output_audio_buffer.stopped"] = "output_audio_buffer.stopped"
    response_id: str


class OutputAudioBufferCleared(ServerEvent):
    type: Literal["output_audio_buffer.cleared"] = "output_audio_buffer.cleared"
    response_id: str


class Timings(BaseModel):
    queue_wait_ms: float
    model_ttft_ms: float | None
    first_word_ms: float | None  # end of speech (or commit) -> first delta handed out
    total_ms: float  # end of speech (or commit) -> response.done
    words: int
    tokens: int
    transport: str
    # Server-side overhead: model's first token -> first delta handed to the transport
    # (includes waiting for the first word to complete), and the first chunk leaving the
    # engine -> handed to the transport (the thread hop and serialisation alone).
    first_token_to_delta_ms: float | None = None
    delivery_ms: float | None = None
    cancel_latency_ms: float | None = None
    # Speech out: end of speech (or commit) -> first audio frame sent; None without speech.
    ttfa_ms: float | None = None
    # How the turn ended (silence, semantic, limit, commit), after how much silence (ms of
    # audio heard after the last speech), and the last speech sample's arrival -> first
    # delta handed out (the latency a speaker lives, on the server's clock).
    end_of_turn: str | None = None
    silence_ms: float | None = None
    speech_to_first_word_ms: float | None = None
    # Did the answer come from a run started while the speaker paused (speculative)?
    speculative: bool | None = None


class ItemDeleted(ServerEvent):
    """An answer taken back: the speaker went on talking, so the turn was not over."""

    type: Literal["conversation.item.deleted"] = "conversation.item.deleted"
    item_id: str


class ResponseDone(ServerEvent):
    type: Literal["response.done"] = "response.done"
    response: Response
    timings: Timings


class Error(ServerEvent):
    type: Literal["error"] = "error"
    error: ErrorDetail


def error_event(code: str, message: str, event_id: str | None = None) -> Error:
    return Error(error=ErrorDetail(code=code, message=message, event_id=event_id))
