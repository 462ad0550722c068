"""The conversation a chat request asks the model to continue, as one list of messages.

Both engines encode this list (the local one through mistral_common's tokenizer, vLLM as
OpenAI chat messages), so they answer exactly the same conversation: the history, then the
new user turn (its audio, with the instructions as text beside it). Without new audio the
instructions join the last user message (they are the newest words the model reads). In a
conversation with audio, system messages join the next user turn's text (Voxtral's format
has no system prompt beside audio).

Function calls: Mistral's prompt format reads a call's result only right after the
assistant turn that made the call, so each output is moved there; a call whose output never
came is left out (the user spoke again instead); an assistant's words followed by its calls
become one turn, as the model produced them. Call ids become the 9 letters and digits
Mistral's format requires (`mistral_call_id`), the same way for a call and its output.
`offered_tools` says which tools the prompt offers under `Request.tool_choice`, and
`must_call` whether the answer has to be a call.
"""

from __future__ import annotations

import base64
import hashlib
import re
import string
from dataclasses import replace
from typing import Any

import numpy as np

from .audio import wav_bytes
from .types import EngineError, Message, Request, Tool

MAX_TOOLS = 128  # OpenAI's own limit per session
TOOL_CHOICES = ("auto", "none", "required")  # or the name of one of the request's tools
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # what Mistral's format accepts
_MISTRAL_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_ALPHANUMERIC = string.ascii_letters + string.digits


def chat_messages(request: Request) -> list[Message]:
    """The messages of a chat request, oldest first; raises `EngineError` for a conversation
    the model cannot continue."""
    messages = list(request.history)
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
    messages = _pair_tool_outputs(_join_assistant_turns(_fold_system(messages)))
    if not messages or messages[-1].role not in ("user", "tool"):
        last = messages[-1].role if messages else "nothing"
        raise EngineError(
            "nothing_to_answer",
            f"the conversation ends with {last}: a user message or a function call's output "
            "must come last",
        )
    return messages


def _fold_system(messages: list[Message]) -> list[Message]:
    """With audio in the conversation, system messages as text before the next user turn's
    (the last one's, if none follows): Voxtral's format (tokenizer v7) refuses a system
    prompt beside audio. Without audio they stay system prompts."""
    if not any(m.audio is not None for m in messages):  # system prompts, first (the format
        # has none after an answer)
        return [m for m in messages if m.role == "system"] + [
            m for m in messages if m.role != "system"
        ]
    out: list[Message] = []
    held: list[str] = []
    for m in messages:
        if m.role == "system":
            if m.text:
                held.append(m.text)
        elif m.role == "user" and held:
            out.append(replace(m, text="\n\n".join([*held, m.text] if m.text else held)))
            held = []
        else:
            out.append(m)
    if held:
        last_user = _last_index(out, "user")
        if last_user is not None:
            m = out[last_user]
            out[last_user] = replace(m, text="\n\n".join([m.text, *held] if m.text else held))
    return out


def _join_assistant_turns(messages: list[Message]) -> list[Message]:
    """An assistant's words and the calls that follow them (two items in a Realtime
    conversation) as one turn: the model said the words, then called."""
    out: list[Message] = []
    for m in messages:
        prev = out[-1] if out else None
        if (
            prev is not None
            and prev.role == m.role == "assistant"
            and not prev.tool_calls
            and m.tool_calls
            and not m.text
        ):
            out[-1] = replace(prev, tool_calls=m.tool_calls)
        else:
            out.append(m)
    return out


def _pair_tool_outputs(messages: list[Message]) -> list[Message]:
    """Each call's output right after the assistant turn that made the call (the newest
    output of a call counts); calls without an output left out."""
    outputs: dict[str, Message] = {}
    for m in messages:
        if m.role == "tool":
            if not m.call_id:
                raise EngineError("invalid_conversation", "a function call output has no call_id")
            outputs[m.call_id] = m
    called = {c.call_id for m in messages if m.role == "assistant" for c in m.tool_calls}
    for call_id in outputs:
        if call_id not in called:
            raise EngineError(
                "invalid_conversation",
                f"a function call output names call_id {call_id!r}, which no function call "
                "in the conversation has",
            )
    out: list[Message] = []
    for m in messages:
        if m.role == "tool":
            continue
        if m.role == "assistant" and m.tool_calls:
            answered = tuple(c for c in m.tool_calls if c.call_id in outputs)
            if not answered and not m.text:
                continue
            out.append(replace(m, tool_calls=answered))
            out.extend(outputs[c.call_id] for c in answered)
        else:
            out.append(m)
    return out


def offered_tools(request: Request) -> tuple[Tool, ...]:
    """The tools the prompt offers: all of them ("auto", "required"), none ("none"), or only
    the one `tool_choice` names. Raises `EngineError` for tools or a choice the model cannot
    be given."""
    tools = request.tools
    if len(tools) > MAX_TOOLS:
        raise EngineError("invalid_tools", f"{len(tools)} tools: at most {MAX_TOOLS} are allowed")
    names = [t.name for t in tools]
    for name in names:
        if not _TOOL_NAME.match(name):
            raise EngineError(
                "invalid_tools",
                f"tool name {name!r}: use 1 to 64 letters, digits, underscores or dashes",
            )
    if len(set(names)) != len(names):
        raise EngineError("invalid_tools", f"two tools share a name: {sorted(names)}")
    choice = request.tool_choice
    if choice == "none":
        return ()
    if choice == "auto":
        return tools
    if choice == "required":
        if not tools:
            raise EngineError("invalid_tool_choice", "tool_choice is required but no tools are set")
        return tools
    named = [t for t in tools if t.name == choice]
    if not named:
        raise EngineError(
            "invalid_tool_choice",
            f"tool_choice {choice!r} is none of {list(TOOL_CHOICES)} nor a tool's name "
            f"(tools: {names})",
        )
    return tuple(named)


def must_call(request: Request) -> bool:
    """The answer has to be a function call: tool_choice "required" or a tool's name."""
    return request.tool_choice not in ("auto", "none")


def mistral_call_id(call_id: str) -> str:
    """`call_id` as the 9 letters and digits Mistral's format requires: kept if it already
    is such an id, else derived from a hash of it (the same for a call and its output)."""
    if _MISTRAL_CALL_ID.match(call_id):
        return call_id
    digest = int.from_bytes(hashlib.sha256(call_id.encode("utf-8")).digest(), "big")
    chars = []
    for _ in range(9):
        digest, i = divmod(digest, len(_ALPHANUMERIC))
        chars.append(_ALPHANUMERIC[i])
    return "".join(chars)


def openai_tool_choice(request: Request) -> str | dict[str, Any]:
    """`tool_choice` in OpenAI's chat format (a name becomes a named-function choice)."""
    if request.tool_choice in TOOL_CHOICES:
        return request.tool_choice
    return {"type": "function", "function": {"name": request.tool_choice}}


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
            call_id = mistral_call_id(m.call_id or "")
            out.append({"role": "tool", "tool_call_id": call_id, "content": m.text})
        elif m.role == "assistant":
            entry: dict[str, Any] = {"role": "assistant", "content": m.text or None}
            if m.tool_calls:
                entry["tool_calls"] = [
                    {
                        "id": mistral_call_id(call.call_id),
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
