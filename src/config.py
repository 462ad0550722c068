"""Typed, frozen settings loaded once from config.yaml, then injected.

Every key is documented in config.yaml at the top of the repository (installed with the
package: `resources.default_config_file()`); the defaults here are the same values, so a
missing file means "all defaults". An unknown key, a wrong type or an
impossible value stops start-up with a `ConfigError` that names the key and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from .models.languages import check_language

Mode = Literal["transcribe", "chat"]

# Environment variables that override single keys (the CLI flags of the same name win).
ENV_CONFIG = "VOXTRAL_CONFIG"
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "VOXTRAL_MODEL": ("model", "id"),
    "VOXTRAL_HOST": ("server", "host"),
    "VOXTRAL_PORT": ("server", "port"),
}


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Section):
    id: str = "mistralai/Voxtral-Mini-3B-2507"
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    compile: Literal["auto", "on", "off"] = "auto"
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune"] = "auto"
    warmup_runs: int = Field(default=2, ge=0, le=20)
    warmup_audio_s: float = Field(default=2.0, gt=0, le=30)
    max_new_tokens: int = Field(default=256, ge=1, le=8192)
    mel: Literal["reduced", "processor"] = "reduced"


class TranscribeSettings(_Section):
    language: Annotated[str | None, AfterValidator(check_language)] = Field(
        default="en", pattern=r"^[a-z]{2}$"
    )


class SamplingSettings(_Section):
    temperature: float = Field(default=0.2, ge=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)


class ConversationSettings(_Section):
    max_turns: int = Field(default=4, ge=0, le=32)
    instructions: str | None = None


class AudioSettings(_Section):
    max_utterance_s: float = Field(default=30.0, gt=0, le=600)
    max_input_rate: float = Field(default=10.0, ge=1, le=1000)


class VllmSettings(_Section):
    endpoints: tuple[str, ...] = Field(
        default=("http://127.0.0.1:8001",), min_length=1, max_length=64
    )
    model: str | None = None
    api_key: str | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0, le=300)
    delta_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    probe_interval_s: float = Field(default=1.0, gt=0, le=300)
    probe_max_interval_s: float = Field(default=30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _urls(self) -> VllmSettings:
        for url in self.endpoints:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoints: {url!r} is not an http(s):// URL")
        return self


class EngineSettings(_Section):
    kind: Literal["transformers", "vllm"] = "transformers"
    queue_size: int = Field(default=32, ge=1, le=10_000)
    max_batch: int = Field(default=16, ge=1, le=256)
    prefill_chunk_tokens: int = Field(default=512, ge=16, le=65_536)
    vllm: VllmSettings = VllmSettings()


class TtsSettings(_Section):
    engine: Literal["none", "espeak", "kokoro"] = "none"
    voice: str | None = None
    speed: float = Field(default=1.0, ge=0.5, le=2.0)
    model: str = "hexgrad/Kokoro-82M"
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    first_phrase_min_words: int = Field(default=2, ge=1, le=64)
    phrase_min_words: int = Field(default=4, ge=1, le=64)
    phrase_timeout_ms: float = Field(default=300.0, gt=0, le=10_000)


class ChunkedResponseSettings(_Section):
    min_words_per_chunk: int = Field(default=1, ge=1, le=64)
    max_words_per_chunk: int = Field(default=1, ge=1, le=64)
    chunk_timeout_ms: float = Field(default=150.0, gt=0, le=10_000)

    @model_validator(mode="after")
    def _min_le_max(self) -> ChunkedResponseSettings:
        if self.min_words_per_chunk > self.max_words_per_chunk:
            raise ValueError(
                "min_words_per_chunk must be <= max_words_per_chunk "
                f"(got {self.min_words_per_chunk} > {self.max_words_per_chunk})"
            )
        return self


class StreamingSettings(_Section):
    latency_target_ms: float = Field(default=300.0, gt=0)


class PerformanceTargets(_Section):
    ttft_ms: float = Field(default=200.0, gt=0)
    total_latency_ms: float = Field(default=2000.0, gt=0)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    auth_token: str | None = Field(default=None, min_length=16)
    allowed_origins: tuple[str, ...] = ()
    max_sessions: int = Field(default=32, ge=1, le=10_000)
    max_event_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    max_request_bytes: int = Field(default=26_214_400, ge=1024, le=1024 * 1_048_576)
    # null = no cap (a reverse proxy or `ssh -L` makes every client one address).
    max_sessions_per_client: int | None = Field(default=8, ge=1, le=10_000)
    # 0 or null = never.
    idle_timeout_s: float | None = Field(default=300.0, ge=0, le=86_400)
    request_header_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # PEM files: serve https:// and wss:// (both or neither).
    tls_cert: str | None = None
    tls_key: str | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = (
                ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            )
            raise ValueError(f"{given} is set but {missing} is not: TLS needs both files")
        return self


class VadSettings(_Section):
    type: Literal["server_vad", "semantic_vad"] = "semantic_vad"
    threshold: float = Field(default=0.5, gt=0, lt=1)
    min_silence_ms: int = Field(default=500, ge=32, le=10_000)
    prefix_padding_ms: int = Field(default=300, ge=0, le=5000)
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"
    speculative: bool = True
    revision_window_ms: int = Field(default=1500, ge=0, le=10_000)
    judge: Literal["smart_turn"] = "smart_turn"
    judge_fallback: bool = False


class IceServer(_Section):
    urls: tuple[str, ...] = Field(min_length=1)
    username: str | None = None
    credential: str | None = None


class WebRTCSettings(_Section):
    enabled: bool = True
    ice_servers: tuple[IceServer, ...] = ()
    ice_transport_policy: Literal["all", "relay"] = "all"
    # coturn's REST-API shared secret (use-auth-secret): TURN servers listed without a
    # username get a fresh credential valid for turn_ttl_s, minted per request.
    turn_secret: str | None = Field(default=None, min_length=16)
    turn_ttl_s: int = Field(default=600, ge=60, le=7 * 86_400)
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)
    max_pending_calls: int = Field(default=4, ge=1, le=1000)
    client_timeout_ms: int = Field(default=3000, ge=100, le=60_000)
    # Incoming audio: how many later packets may arrive while a missing one is waited for.
    jitter_window: int = Field(default=2, ge=0, le=32)

    @model_validator(mode="after")
    def _consistent(self) -> WebRTCSettings:
        for server in self.ice_servers:
            turn = any(url.startswith(("turn:", "turns:")) for url in server.urls)
            if turn and server.username is None and self.turn_secret is None:
                raise ValueError(
                    f"ice_servers: {list(server.urls)} is a TURN server without a username "
                    "and credential; set them, or webrtc.turn_secret to mint them"
                )
            if (server.username is None) != (server.credential is None):
                raise ValueError(
                    f"ice_servers: {list(server.urls)} needs both username and credential"
                )
        return self


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: str | None = "logs/voxtral_streaming.log"
    max_bytes: int = Field(default=10_000_000, ge=10_000)
    backups: int = Field(default=5, ge=0, le=100)
    client_report_wait_ms: int = Field(default=2000, ge=0, le=60_000)


class Settings(_Section):
    mode: Literal["transcribe", "chat"] = "chat"
    model: ModelSettings = ModelSettings()
    transcribe: TranscribeSettings = TranscribeSettings()
    chat: SamplingSettings = SamplingSettings()
    conversation: ConversationSettings = ConversationSettings()
    audio: AudioSettings = AudioSettings()
    engine: EngineSettings = EngineSettings()
    tts: TtsSettings = TtsSettings()
    chunked_response: ChunkedResponseSettings = ChunkedResponseSettings()
    streaming: StreamingSettings = StreamingSettings()
    performance_targets: PerformanceTargets = PerformanceTargets()
    vad: VadSettings = VadSettings()
    webrtc: WebRTCSettings = WebRTCSettings()
    server: ServerSettings = ServerSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _a_turn_per_conversation(self) -> Settings:
        # Each conversation has at most one turn waiting for the model: with room for all of
        # them, a committed spoken turn is never refused (engine_busy) and so never lost.
        if self.engine.kind == "transformers" and self.engine.queue_size < self.server.max_sessions:
            raise ValueError(
                f"engine.queue_size ({self.engine.queue_size}) must be at least "
                f"server.max_sessions ({self.server.max_sessions}): every open conversation "
                "may have a turn waiting for the model"
            )
        return self

    def with_overrides(self, overrides: Mapping[tuple[str, str], Any]) -> Settings:
        """A copy with `{(section, key): value}` replaced, validated like the file."""
        data = self.model_dump()
        for (section, key), value in overrides.items():
            if value is not None:
                data[section][key] = value
        return _validate(data, source="overrides")


# Keys that existed once: what replaced them, so an old config file says what to do.
REMOVED_KEYS = {
    "tts.sample_rate": "removed: the WebSocket's speech now comes in each session's "
    "audio.output.format (PCM16 at 24 kHz unless the client asks otherwise)",
}


def _describe(error: Any) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: {REMOVED_KEYS.get(key, 'unknown key')}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def _validate(data: Mapping[str, Any], source: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None


def default_config_path() -> Path | None:
    """$VOXTRAL_CONFIG, else ./config.yaml if present, else None (built-in defaults).

    The config.yaml installed with the package is deliberately not a further fallback: it
    holds the built-in defaults (a test keeps them equal), so loading it would change
    nothing, and an editable install would find the checkout's copy, which a developer may
    have edited for one machine, and apply it from any directory. It is the template to copy.
    """
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    local = Path("config.yaml")
    return local if local.is_file() else None


def load_settings(
    path: Path | None = None,
    overrides: Mapping[tuple[str, str], Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """File (or defaults) <- environment <- explicit overrides (CLI flags)."""
    path = path if path is not None else default_config_path()
    data: Any = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    settings = _validate(data, source=source)
    env = os.environ if environ is None else environ
    merged: dict[tuple[str, str], Any] = {
        target: env[name] for name, target in ENV_OVERRIDES.items() if env.get(name)
    }
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return settings.with_overrides(merged) if merged else settings
