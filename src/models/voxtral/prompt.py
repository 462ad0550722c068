"""Prompt token ids from the processor's own tokenizer (mistral_common), never its features.

These are the calls `VoxtralProcessor.apply_transcription_request` and `apply_chat_template`
make for their `input_ids`; we skip the feature extractor they run next, because the log-mel
comes from `mel.LogMel`. The number of `[AUDIO]` tokens depends only on the audio's length.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.transcription.request import TranscriptionRequest

from ..audio import wav_bytes
from ..types import Turn


def _audio_part(audio: np.ndarray) -> dict[str, Any]:
    data = base64.b64encode(wav_bytes(audio)).decode("ascii")
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


class PromptBuilder:
    def __init__(self, processor: Any, model_id: str) -> None:
        self._tokenizer = processor.tokenizer.tokenizer  # mistral_common's MistralTokenizer
        self._model_id = model_id

    def transcription(self, audio: np.ndarray, language: str | None) -> list[int]:
        request = TranscriptionRequest.from_openai(
            {"model": self._model_id, "file": io.BytesIO(wav_bytes(audio)), "language": language}
        )
        return list(self._tokenizer.encode_transcription(request).tokens)

    def chat(
        self, audio: np.ndarray, instructions: str | None, history: Sequence[Turn]
    ) -> list[int]:
        messages: list[dict[str, Any]] = []
        for turn in history:
            messages.append({"role": "user", "content": [_audio_part(turn.audio)]})
            messages.append({"role": "assistant", "content": turn.answer})
        content = [_audio_part(audio)]
        if instructions:
            content.append({"type": "text", "text": instructions})
        messages.append({"role": "user", "content": content})
        request = ChatCompletionRequest.from_openai(messages=messages)
        return list(self._tokenizer.encode_chat_completion(request).tokens)
