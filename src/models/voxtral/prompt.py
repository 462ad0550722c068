"""Prompt token ids from the processor's own tokenizer (mistral_common), never its features.

These are the calls `VoxtralProcessor.apply_transcription_request` and `apply_chat_template`
make for their `input_ids`; we skip the feature extractor they run next, because the log-mel
comes from `mel.LogMel`. The number of `[AUDIO]` tokens depends only on the audio's length.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.transcription.request import TranscriptionRequest

from ..audio import wav_bytes
from ..chat import openai_messages, openai_tools
from ..types import EngineError, Message, Tool


class PromptBuilder:
    def __init__(self, processor: Any, model_id: str) -> None:
        self._tokenizer = processor.tokenizer.tokenizer  # mistral_common's MistralTokenizer
        self._model_id = model_id
        # The token Voxtral starts a function call with (its answer then is the call's JSON).
        self.tool_calls_token: int = self._tokenizer.instruct_tokenizer.TOOL_CALLS

    def transcription(self, audio: np.ndarray, language: str | None) -> list[int]:
        request = TranscriptionRequest.from_openai(
            {"model": self._model_id, "file": io.BytesIO(wav_bytes(audio)), "language": language}
        )
        return list(self._tokenizer.encode_transcription(request).tokens)

    def chat(self, messages: list[Message], tools: tuple[Tool, ...] = ()) -> list[int]:
        """The conversation `chat.chat_messages` gives, encoded for the model to answer, with
        `tools` (`chat.offered_tools`) offered before the last user turn. Raises
        `EngineError` (invalid_conversation) for one Mistral's format cannot carry."""
        kwargs: dict[str, Any] = {"tools": openai_tools(tools)} if tools else {}
        try:
            request = ChatCompletionRequest.from_openai(
                messages=openai_messages(messages), **kwargs
            )
            return list(self._tokenizer.encode_chat_completion(request).tokens)
        # (pydantic's ValidationError is a ValueError; mistral_common asserts some rules)
        except (MistralCommonException, ValueError, AssertionError) as exc:
            raise EngineError(
                "invalid_conversation", f"the conversation cannot be given to the model: {exc}"
            ) from None
