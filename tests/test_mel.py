"""The reduced log-mel equals the processor's input_features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import speech_like
from transformers import AutoProcessor

from voxtral_server.models.audio import PCM16_SCALE, SAMPLE_RATE
from voxtral_server.models.mel import LogMel, processor_features


@pytest.fixture(scope="module")
def processor(tiny_random: Path):  # type: ignore[no-untyped-def]
    return AutoProcessor.from_pretrained(str(tiny_random))


def reference_features(processor, audio: np.ndarray) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """What the stock pipeline feeds the model: apply_transcription_request's features."""
    inputs = processor.apply_transcription_request(
        language="en", audio=audio, sampling_rate=SAMPLE_RATE, format="wav", model_id="tiny"
    )
    features: torch.Tensor = inputs["input_features"]
    return features


CASES = {
    "1s": speech_like(1.0, seed=1),
    "3s": speech_like(3.0, seed=2),
    "10s": speech_like(10.0, seed=3),
    "40s_two_windows": speech_like(40.0, seed=4),
    "silence": np.zeros(2 * SAMPLE_RATE, np.float32),
    "near_silence": (
        np.random.default_rng(5).integers(-2, 3, 2 * SAMPLE_RATE) / PCM16_SCALE
    ).astype(np.float32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reduced_mel_matches_processor(processor, name: str) -> None:  # type: ignore[no-untyped-def]
    audio = CASES[name]
    expected = reference_features(processor, audio)
    mel = LogMel(np.asarray(processor.feature_extractor.mel_filters), torch.device("cpu"))
    got = mel(audio)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("seconds", [0.005, 29.99, 30.0, 60.0])
def test_edges_of_a_window(processor, seconds: float) -> None:  # type: ignore[no-untyped-def]
    # Shorter than one STFT window, within a window of the 30 s edge, exactly on it.
    audio = speech_like(seconds, seed=7)
    expected = reference_features(processor, audio)
    mel = LogMel(np.asarray(processor.feature_extractor.mel_filters), torch.device("cpu"))
    assert (mel(audio) - expected).abs().max().item() <= 1e-6


def test_processor_switch_gives_the_processor_features(processor) -> None:  # type: ignore[no-untyped-def]
    audio = CASES["3s"]
    got = processor_features(processor.feature_extractor, audio)
    assert torch.equal(got, reference_features(processor, audio))


def test_empty_audio_is_refused(processor) -> None:  # type: ignore[no-untyped-def]
    mel = LogMel(np.asarray(processor.feature_extractor.mel_filters), torch.device("cpu"))
    with pytest.raises(ValueError, match="empty"):
        mel(np.zeros(0, np.float32))
