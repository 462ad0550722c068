"""What a client may change with `session.update`, and what session.created/updated report."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from ...config import Settings, VadSettings
from ...models.types import Mode
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


@dataclass(frozen=True)
class SessionSettings:
    mode: Mode
    language: str | None
    instructions: str | None
    turn_detection: TurnDetection | None  # None: push-to-talk
    # The WebSocket's audio formats (WebRTC carries Opus on its tracks whatever these say).
    input_format: AudioFormat = DEFAULT_FORMAT
    output_format: AudioFormat = DEFAULT_FORMAT

    @classmethod
    def from_config(cls, settings: Settings) -> SessionSettings:
        return cls(
            settings.mode,
            settings.transcribe.language,
            settings.conversation.instructions,
            TurnDetection.defaults(settings.vad),
        )

    def updated(self, cfg: p.SessionConfig, vad: VadSettings) -> SessionSettings:
        """These settings with a session.update's fields applied (absent fields unchanged;
        a turn_detection's absent fields take the server's defaults)."""
        new = self
        if cfg.type is not None:
            new = replace(new, mode="chat" if cfg.type == "realtime" else "transcribe")
        if "instructions" in cfg.model_fields_set:
            new = replace(new, instructions=cfg.instructions or None)
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
        return p.SessionState(
            id=session_id,
            type="realtime" if self.mode == "chat" else "transcription",
            model=model,
            instructions=self.instructions,
            audio={
                "input": {
                    "format": self.input_format.describe(),
                    "turn_detection": td.describe() if td is not None else None,
                    "transcription": {"language": self.language},
                },
                "output": {"format": self.output_format.describe()},
            },
        )
