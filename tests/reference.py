"""The plain transformers pipeline the engine is held to: processor features + generate."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoProcessor, VoxtralForConditionalGeneration

from voxtral_server.models.audio import SAMPLE_RATE, wav_bytes
from voxtral_server.models.types import Request

MAX_NEW = 24


def reference_ids(model_dir: Path, request: Request) -> list[int]:
    """Plain pipeline: processor features + model.generate, greedy."""
    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = VoxtralForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    if request.mode == "transcribe":
        inputs = processor.apply_transcription_request(
            language=request.language,
            audio=request.audio,
            sampling_rate=SAMPLE_RATE,
            format="wav",
            model_id=str(model_dir),
        )
    else:

        def audio_part(audio: np.ndarray) -> dict[str, str]:
            return {"type": "audio", "base64": base64.b64encode(wav_bytes(audio)).decode()}

        conversation: list[dict[str, Any]] = []
        for m in request.history:
            if m.role == "user":
                assert m.audio is not None
                conversation.append({"role": "user", "content": [audio_part(m.audio)]})
            else:
                conversation.append({"role": m.role, "content": m.text})
        assert request.audio is not None
        conversation.append({"role": "user", "content": [audio_part(request.audio)]})
        inputs = processor.apply_chat_template(conversation)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    ids: list[int] = out[0, inputs["input_ids"].shape[1] :].tolist()
    return ids
