"""The conversation a chat request asks the model to continue, as one list of messages.

Both engines encode this list (the local one through mistral_common's tokenizer, vLLM as
OpenAI chat messages), so they answer exactly the same conversation: the history, then the
new user turn (its audio, with the instructions as text beside it). Without new audio the
instructions join the last user message (they are the newest words the model reads). System
messages go first: the model's format has a system prompt only before the conversation.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import numpy as np

from .audio import wav_bytes
from .types import EngineError, Message, Request, Tool


def chat_messages(request: Request) -> list[Message]:
    """The messages of a chat request, oldest first; raises `EngineError` for a conversation
    the model cannot continue."""
    # The model reads system messages only before the conversation: they go first, in order.
    messages = [m for m in request.history if m.role == "system"]
    messages += [m for m in request.history if m.role != "system"]
    instructions = request.instructions or ""
    if request.audio is not None:
        messages.append(Message("user", instructions, request.audio))
    elif instructions:
        last_user = _last_index(messages, "user")
        if last_user is None:
            messages.append(Message("user", instructions))
        else:
            m = messages[last_user]
            text = f"{m.text}\n\n{instructions}" if m.text else instructions
            messages[last_user] = replace(m, text=text)
    if not messages or messages[-1].role not in ("user", "tool"):
        last = messages[-1].role if messages else "nothing"
        raise EngineError(
            "nothing_to_answer",
            f"the conversation ends with {last}: a user message or a function call's output "
            "must come last",
        )
    return messages


def audios(messages: list[Message]) -> list[np.ndarray]:
    """Every utterance of the conversation, in the order the prompt carries them."""
    return [m.audio for m in messages if m.audio is not None]


def _last_index(messages: list[Message], role: str) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == role:
            return i
    return None


def openai_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """The messages in OpenAI's chat format (what vLLM takes, and what mistral_common's
    `ChatCompletionRequest.from_openai` reads): audio as base64 WAV `input_audio` parts."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.call_id, "content": m.text})
        elif m.role == "assistant":
            entry: dict[str, Any] = {"role": "assistant", "content": m.text or None}
            if m.tool_calls:
                entry["tool_calls"] = [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                    for call in m.tool_calls
                ]
            out.append(entry)
        elif m.role == "system":
            out.append({"role": "system", "content": m.text})
        else:
            content: list[dict[str, Any]] = []
            if m.audio is not None:
                content.append(audio_part(m.audio))
            if m.text:
                content.append({"type": "text", "text": m.text})
            out.append({"role": "user", "content": content})
    return out


def openai_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters or {"type": "object", "properties": {}},
            },
        }
        for t in tools
    ]


def audio_part(audio: np.ndarray) -> dict[str, Any]:
    data = base64.b64encode(wav_bytes(audio)).decode("ascii")
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
