"""What a client may change with `session.update`, and what session.created/updated report."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from ...config import Settings, VadSettings
from ...models.types import Mode, Tool
from .. import protocol as p
from ..audio_formats import DEFAULT_FORMAT, AudioFormat, audio_format
from .endpointing import EAGERNESS, Eagerness

TurnType = Literal["server_vad", "semantic_vad"]
EagernessName = Literal["low", "medium", "high", "auto"]

T = TypeVar("T")


def _given(value: T | None, default: T) -> T:
    return value if value is not None else default


@dataclass(frozen=True)
class TurnDetection:
    """Turn detection settings of a session (`turn_detection` of session.update)."""

    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int
    create_response: bool = True
    interrupt_response: bool = True
    type: TurnType = "server_vad"
    eagerness: EagernessName = "auto"

    @classmethod
    def defaults(cls, v: VadSettings) -> TurnDetection:
        return cls(
            v.threshold, v.prefix_padding_ms, v.min_silence_ms, type=v.type, eagerness=v.eagerness
        )

    @property
    def semantic(self) -> Eagerness | None:
        return EAGERNESS[self.eagerness] if self.type == "semantic_vad" else None

    @property
    def silence_ends_turn_ms(self) -> int:
        """The silence after which the turn ends whatever was said."""
        semantic = self.semantic
        return semantic.max_wait_ms if semantic is not None else self.silence_duration_ms

    def describe(self) -> dict[str, Any]:
        if self.type == "semantic_vad":
            return {
                "type": "semantic_vad",
                "eagerness": self.eagerness,
                "create_response": self.create_response,
                "interrupt_response": self.interrupt_response,
            }
        return {
            "type": "server_vad",
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
            "create_response": self.create_response,
            "interrupt_response": self.interrupt_response,
        }


Modality = Literal["text", "audio"]


@dataclass(frozen=True)
class SessionSettings:
    mode: Mode
    language: str | None
    instructions: str | None
    turn_detection: TurnDetection | None  # None: push-to-talk
    # How answers come: "audio" (spoken, with a transcript) or "text".
    output_modality: Modality = "text"
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"  # auto | none | required | a tool's name
    max_output_tokens: int | None = None  # None: "inf" (model.max_new_tokens)
    # The user's words written down after each committed turn (input_audio_transcription
    # events): the model name the client asked for, or None (off).
    transcription_model: str | None = None
    spoken_events: bool = False  # extension: voxtral.output_audio.spoken
    # The WebSocket's audio formats (WebRTC carries Opus on its tracks whatever these say).
    input_format: AudioFormat = DEFAULT_FORMAT
    output_format: AudioFormat = DEFAULT_FORMAT

    @classmethod
    def from_config(cls, settings: Settings, can_speak: bool = False) -> SessionSettings:
        return cls(
            settings.mode,
            settings.transcribe.language,
            settings.conversation.instructions,
            TurnDetection.defaults(settings.vad),
            output_modality="audio" if can_speak else "text",
        )

    def updated(self, cfg: p.SessionConfig, vad: VadSettings) -> SessionSettings:
        """These settings with a session.update's fields applied (absent fields unchanged;
        a turn_detection's absent fields take the server's defaults)."""
        new = self
        if cfg.type is not None:
            new = replace(new, mode="chat" if cfg.type == "realtime" else "transcribe")
        if "instructions" in cfg.model_fields_set:
            new = replace(new, instructions=cfg.instructions or None)
        if cfg.output_modalities:
            new = replace(new, output_modality=cfg.output_modalities[0])
        if cfg.tools is not None:
            new = replace(new, tools=tools_of(cfg.tools))
        if cfg.tool_choice is not None:
            new = replace(new, tool_choice=tool_choice_of(cfg.tool_choice))
        if "max_output_tokens" in cfg.model_fields_set:
            new = replace(new, max_output_tokens=max_tokens_of(cfg.max_output_tokens))
        if cfg.voxtral is not None:
            new = replace(new, spoken_events=cfg.voxtral.spoken_events)
        audio_out = cfg.audio.output if cfg.audio else None
        if audio_out is not None and audio_out.format is not None:
            fmt = audio_format(audio_out.format, "session.audio.output.format")
            new = replace(new, output_format=fmt)
        audio_in = cfg.audio.input if cfg.audio else None
        if audio_in is None:
            return new
        if audio_in.format is not None:
            fmt = audio_format(audio_in.format, "session.audio.input.format")
            new = replace(new, input_format=fmt)
        if "transcription" in audio_in.model_fields_set:
            t = audio_in.transcription
            new = replace(new, transcription_model=(t.model or "voxtral") if t else None)
        if audio_in.transcription is not None and audio_in.transcription.language:
            new = replace(new, language=audio_in.transcription.language)
        if "turn_detection" in audio_in.model_fields_set:
            td = audio_in.turn_detection
            detection = None
            if td is not None:
                detection = TurnDetection(
                    _given(td.threshold, vad.threshold),
                    _given(td.prefix_padding_ms, vad.prefix_padding_ms),
                    _given(td.silence_duration_ms, vad.min_silence_ms),
                    td.create_response,
                    td.interrupt_response,
                    td.type,
                    _given(td.eagerness, vad.eagerness),
                )
            new = replace(new, turn_detection=detection)
        return new

    def state(self, session_id: str, model: str) -> p.SessionState:
        """The `session` object of session.created / session.updated."""
        td = self.turn_detection
        transcription: dict[str, Any] | None = None
        if self.transcription_model is not None or self.mode == "transcribe":
            transcription = {"model": self.transcription_model or "voxtral"}
            if self.language:
                transcription["language"] = self.language
        return p.SessionState(
            id=session_id,
            type="realtime" if self.mode == "chat" else "transcription",
            model=model,
            instructions=self.instructions,
            output_modalities=[self.output_modality],
            audio={
                "input": {
                    "format": self.input_format.describe(),
                    "turn_detection": td.describe() if td is not None else None,
                    "transcription": transcription,
                },
                "output": {"format": self.output_format.describe()},
            },
            tools=[
                {
                    "type": "function",
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                }
                for t in self.tools
            ],
            tool_choice=self.tool_choice
            if self.tool_choice in ("auto", "none", "required")
            else {"type": "function", "name": self.tool_choice},
            max_output_tokens=self.max_output_tokens or "inf",
        )


def tools_of(params: list[p.ToolParam]) -> tuple[Tool, ...]:
    names = [t.name for t in params]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise p.ProtocolError("invalid_tools", f"tool names must be unique: {', '.join(repeated)}")
    return tuple(Tool(t.name, t.description, t.parameters) for t in params)


def tool_choice_of(choice: p.ToolChoice) -> str:
    return choice if isinstance(choice, str) else choice.name


def max_tokens_of(value: int | str | None) -> int | None:
    return value if isinstance(value, int) else None
