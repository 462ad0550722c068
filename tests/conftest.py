"""Shared fixtures: tiny checkpoints built once per run, engines over them, test audio."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# Nothing in the suite may reach a model hub: fail fast instead of retrying a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from voxtral_server.config import Settings
from voxtral_server.models.audio import PCM16_SCALE, SAMPLE_RATE
from voxtral_server.models.tiny import build_tiny
from voxtral_server.models.voxtral import VoxtralEngine

SCRIPT = "Hello world, the quick brown fox jumps over the lazy dog."
# The tool-scripted checkpoint answers a user turn with this call, and a function's result
# with TOOL_ANSWER.
TOOL_NAME = "get_weather"
TOOL_ARGS = '{"city": "Paris", "unit": "celsius"}'
TOOL_ANSWER = "It is sunny in Paris."
REPO = Path(__file__).resolve().parent.parent
SAMPLE_WAV = REPO / "static" / "sample.wav"


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced-sounding noise on the PCM16 grid (|x| < 0.5), like audio that came over a wire."""
    n = int(seconds * SAMPLE_RATE)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SAMPLE_RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    voiced = np.sin(2 * np.pi * 140.0 * t) + 0.5 * np.sin(2 * np.pi * 280.0 * t)
    x = 0.2 * envelope * voiced + 0.02 * rng.standard_normal(n)
    return (np.round(np.clip(x, -0.49, 0.49) * PCM16_SCALE) / PCM16_SCALE).astype(np.float32)


def engine_settings(model_dir: Path, **sections: dict[str, object]) -> Settings:
    data = Settings().model_dump()
    data["model"].update({"id": str(model_dir), "warmup_runs": 1})
    for name, values in sections.items():
        data[name].update(values)
    return Settings.model_validate(data)


@pytest.fixture(scope="session")
def tiny_random(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-random"))


@pytest.fixture(scope="session")
def tiny_scripted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-scripted"), script=SCRIPT)


@pytest.fixture(scope="session")
def tiny_tool_scripted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(
        tmp_path_factory.mktemp("tiny-tool"), script=TOOL_ANSWER, tool_call=(TOOL_NAME, TOOL_ARGS)
    )


@pytest.fixture(scope="session")
def tool_engine(tiny_tool_scripted: Path) -> Iterator[VoxtralEngine]:
    engine = VoxtralEngine.load(engine_settings(tiny_tool_scripted))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def scripted_engine(tiny_scripted: Path) -> Iterator[VoxtralEngine]:
    engine = VoxtralEngine.load(engine_settings(tiny_scripted))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def random_engine(tiny_random: Path) -> Iterator[VoxtralEngine]:
    engine = VoxtralEngine.load(engine_settings(tiny_random))
    yield engine
    engine.close()
