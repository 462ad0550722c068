"""Where the model runs (device, dtype, compile) and loading it: a local folder or a hub id,
with one clear error naming the model when that fails."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, VoxtralForConditionalGeneration

from ...config import Settings
from ..types import ModelLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs, resolved from `model.*` settings and the hardware."""

    device: torch.device
    dtype: torch.dtype
    compile: bool
    compile_mode: str

    @classmethod
    def resolve(cls, settings: Settings) -> Runtime:
        m = settings.model
        if m.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(m.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ModelLoadError(f"model.device is {m.device!r} but no CUDA device is visible")
        on_cuda = device.type == "cuda"
        if m.dtype == "auto":
            dtype = torch.bfloat16 if on_cuda else torch.float32
        else:
            dtype = getattr(torch, m.dtype)
        compile_on = m.compile == "on" or (m.compile == "auto" and on_cuda)
        mode = m.compile_mode
        if mode == "auto":
            mode = "reduce-overhead" if on_cuda else "default"  # CUDA graphs exist on CUDA only
        return cls(device, dtype, compile_on, mode)


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", ".", "~")) or Path(model_id).exists()


def _cached_on_disk(model_id: str) -> bool:
    """True when a hub id's files are already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def load_pretrained(settings: Settings, runtime: Runtime) -> tuple[Any, Any]:
    """Processor + model from a local folder or a hub id; one clear error when that fails.

    A hub id already in the local cache loads without touching the network; otherwise it is
    downloaded (which, with no network, takes the hub client's retries to fail).
    """
    model_id = settings.model.id
    hint = (
        "Point model.id (or --model) at a local folder or a hub id this machine can "
        "download; for an offline demo build a tiny checkpoint with `voxtral-server "
        "make-tiny DIR` and pass `--model DIR`."
    )
    if _looks_like_path(model_id):
        folder = Path(model_id).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"cannot load model {model_id!r}: no config.json in that folder. {hint}"
            )
        source, local_only = str(folder), True
    else:
        source, local_only = model_id, _cached_on_disk(model_id)
        if not local_only:
            logger.info("model %s is not in the local cache: downloading it from the hub", model_id)
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
        model = VoxtralForConditionalGeneration.from_pretrained(
            source,
            dtype=runtime.dtype,
            attn_implementation=settings.model.attn_implementation,
            local_files_only=local_only,
        )
    except (OSError, ValueError, ImportError, KeyError) as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0].rstrip(".") if text else type(exc).__name__
        raise ModelLoadError(f"cannot load model {model_id!r}: {reason}. {hint}") from exc
    return processor, model.to(runtime.device).eval()
