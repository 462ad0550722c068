"""Smart Turn v3.2 (BSD-2, by the pipecat authors) through onnxruntime: P(turn complete) from
the last 8 s of the turn's audio.

The model and its Whisper-style feature extractor come from the `pipecat-ai` wheel, imported,
never copied; `local_smart_turn_v3.py` there is the reference this reproduces: 16 kHz audio,
the last 8 s, left-padded with zeros; 80-bin log-mel with the waveform normalised; one input
`input_features` of shape (1, 80, 800); the output is already a sigmoid probability.
"""

from __future__ import annotations

import importlib.resources
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..audio import SAMPLE_RATE
from .base import TurnJudgeUnavailable

logger = logging.getLogger(__name__)

INSTALL = "pip install 'pipecat-ai>=1.14,<1.15'"  # the package that ships model and features
MODEL_PACKAGE = "pipecat.audio.turn.smart_turn.data"
MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
INPUT_NAME = "input_features"
WINDOW_S = 8  # the model sees this much of the end of the turn
WINDOW_SAMPLES = WINDOW_S * SAMPLE_RATE

FeatureFn = Callable[..., np.ndarray]


def last_window(audio: np.ndarray) -> np.ndarray:
    """The last WINDOW_S of `audio` as float32, left-padded with zeros when shorter."""
    tail = np.asarray(audio, dtype=np.float32)[-WINDOW_SAMPLES:]
    if tail.size == WINDOW_SAMPLES:
        return tail
    return np.pad(tail, (WINDOW_SAMPLES - tail.size, 0))


def bundled_model_path() -> Path:
    """Where the `pipecat-ai` wheel keeps Smart Turn's ONNX file (it may not exist)."""
    return Path(str(importlib.resources.files(MODEL_PACKAGE).joinpath(MODEL_FILE)))


def _runtime() -> tuple[Any, FeatureFn]:
    """(onnxruntime, pipecat's Whisper log-mel function), or TurnJudgeUnavailable."""
    try:
        import onnxruntime
        from loguru import logger as loguru_logger  # pipecat's logger, a dependency of it

        # pipecat logs a banner to stderr when imported; only its model and features are
        # used here, so its own log lines have nothing to say to this server's operator.
        loguru_logger.disable("pipecat")
        from pipecat.audio.turn.smart_turn._whisper_features import (
            compute_whisper_log_mel_features,
        )
    except ImportError as exc:  # also onnxruntime's own shared-library failures
        raise TurnJudgeUnavailable(
            f"Smart Turn needs the package pipecat-ai (with onnxruntime): {INSTALL} ({exc})"
        ) from exc
    return onnxruntime, compute_whisper_log_mel_features


class SmartTurnJudge:
    """Smart Turn v3.2 on the CPU. Loads and warms up in the constructor."""

    name = "smart_turn"

    def __init__(self, *, threads: int = 1, model_path: Path | None = None) -> None:
        ort, self._features = _runtime()
        try:
            path = model_path or bundled_model_path()
        except (ImportError, OSError) as exc:
            raise TurnJudgeUnavailable(
                f"Smart Turn's model is not where pipecat-ai keeps it: {INSTALL} ({exc})"
            ) from exc
        if not path.is_file():
            raise TurnJudgeUnavailable(
                f"Smart Turn's model file {path} is missing; reinstall the package that ships "
                f"it: {INSTALL}"
            )
        options = ort.SessionOptions()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = threads
        # With more than one thread, idle workers would spin on a core the engine needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t0 = time.perf_counter()
        try:
            self._session: Any = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise TurnJudgeUnavailable(
                f"onnxruntime cannot load Smart Turn's model {path}: {exc}; "
                f"reinstall with {INSTALL}"
            ) from exc
        self._lock = threading.Lock()  # close() may come from another thread than a call
        load_ms = (time.perf_counter() - t0) * 1000
        # The first run allocates and plans: pay for it here, not in the first turn.
        t0 = time.perf_counter()
        self.completeness(np.zeros(SAMPLE_RATE, dtype=np.float32))
        self.warmup_ms = (time.perf_counter() - t0) * 1000
        logger.info(
            "turn judge loaded: smart_turn model=%s threads=%d load_ms=%.1f warmup_ms=%.1f",
            path.name,
            threads,
            load_ms,
            self.warmup_ms,
        )

    def completeness(self, audio: np.ndarray) -> float:
        if audio.ndim != 1:
            raise ValueError(f"expected one-dimensional audio, got shape {audio.shape}")
        mel = self._features(last_window(audio), do_normalize=True)
        with self._lock:
            if self._session is None:
                raise RuntimeError("the Smart Turn judge is closed")
            outputs = self._session.run(None, {INPUT_NAME: mel[np.newaxis]})
        return float(np.clip(np.asarray(outputs[0]).reshape(-1)[0], 0.0, 1.0))

    def close(self) -> None:
        with self._lock:
            self._session = None
