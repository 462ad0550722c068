"""config.yaml: documented, in sync with the code, and strict about mistakes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

from voxtral_server.config import ConfigError, Settings, load_settings

CONFIG = REPO / "config.yaml"


def _keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _keys(value, prefix + key + ".")
    return keys


def test_shipped_config_equals_the_defaults() -> None:
    assert load_settings(CONFIG, environ={}) == Settings()


def test_every_key_is_in_the_file_and_documented() -> None:
    text = CONFIG.read_text()
    in_file = set(_keys(yaml.safe_load(text)))
    assert in_file == set(_keys(Settings().model_dump()))
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            above = lines[i - 1].strip()
            assert above.startswith("#"), f"undocumented key: {stripped}"


def test_kept_keys_of_the_original_system_exist() -> None:
    s = Settings()
    assert s.streaming.latency_target_ms > 0
    assert s.performance_targets.ttft_ms > 0 and s.performance_targets.total_latency_ms > 0
    assert s.chunked_response.min_words_per_chunk == s.chunked_response.max_words_per_chunk == 1
    assert s.chunked_response.chunk_timeout_ms > 0


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("tts:\n  sample_rate: 24000\n", "tts.sample_rate: removed: the WebSocket's speech"),
        ("model:\n  colour: blue\n", "model.colour: unknown key"),
        ("modle:\n  id: x\n", "modle: unknown key"),
        ("model:\n  warmup_runs: many\n", "model.warmup_runs"),
        ("server:\n  port: 70000\n", "server.port"),
        (
            "chunked_response:\n  min_words_per_chunk: 3\n  max_words_per_chunk: 2\n",
            "min_words_per_chunk",
        ),
        ("model:\n  device: tpu\n", "model.device"),
        ("webrtc:\n  jitter_window: 33\n", "webrtc.jitter_window: Input should be less than"),
        ("webrtc:\n  jitter_window: -1\n", "webrtc.jitter_window: Input should be greater than"),
        ("audio:\n  max_utterance_s: -1\n", "audio.max_utterance_s"),
        ("- just\n- a list\n", "mapping"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_mistakes_stop_start_up_naming_the_key(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        load_settings(path, environ={})


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_environment_then_flags_override_model_host_port() -> None:
    env = {"VOXTRAL_MODEL": "/models/env", "VOXTRAL_HOST": "0.0.0.0", "VOXTRAL_PORT": "9000"}
    s = load_settings(CONFIG, environ=env)
    assert (s.model.id, s.server.host, s.server.port) == ("/models/env", "0.0.0.0", 9000)
    s = load_settings(CONFIG, {("model", "id"): "/models/flag", ("server", "port"): 9100}, env)
    assert (s.model.id, s.server.host, s.server.port) == ("/models/flag", "0.0.0.0", 9100)
    with pytest.raises(ConfigError, match="server.port"):
        load_settings(CONFIG, environ={"VOXTRAL_PORT": "eighty"})


def test_settings_are_frozen() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings().model.id = "other"  # type: ignore[misc]
