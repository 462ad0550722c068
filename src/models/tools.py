"""The model's function calls: from what it generated to checked `ToolCall`s.

Voxtral (tokenizer v7) calls functions by writing `[TOOL_CALLS]` then a JSON list of
`{"name": ..., "arguments": {...}}` (an `"id"` may ride along), then EOS: `parse_mistral`
reads that text (the local engine); vLLM's `mistral` tool parser sends the same calls as
streamed `delta.tool_calls`, which `ToolCallParts` puts together. Either way each call must
name a tool the request offered and carry a JSON object as arguments, else the answer ends
with `invalid_tool_call`, quoting what the model wrote. A call keeps the id the model gave
unless the conversation already holds it; otherwise it gets a fresh `call_` + 24 hex digits.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .chat import mistral_call_id, must_call
from .types import EngineError, Message, Request, Tool, ToolCall

QUOTE_CHARS = 200  # of the model's output quoted in an invalid_tool_call message


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def call_ids(history: Iterable[Message]) -> set[str]:
    """The call ids a conversation already holds, as the client gave them and as the prompt
    shows them (a new call must reuse neither: the model may copy one from its prompt)."""
    ids = {c.call_id for m in history for c in m.tool_calls}
    return ids | {mistral_call_id(i) for i in ids}


def invalid_call(problem: str, produced: str) -> EngineError:
    quoted = produced if len(produced) <= QUOTE_CHARS else produced[:QUOTE_CHARS] + "..."
    return EngineError("invalid_tool_call", f"the model's function call {problem}: {quoted!r}")


def checked_call(
    call_id: Any, name: Any, arguments: Any, offered: tuple[Tool, ...], taken: set[str]
) -> ToolCall:
    """One call, checked against the offered tools; `arguments` is a JSON object or its
    text. Adds the call's id to `taken`. Raises `EngineError` (invalid_tool_call)."""
    args_text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    names = [t.name for t in offered]
    if not isinstance(name, str) or name not in names:
        raise invalid_call(f"names {name!r}, which is not an offered tool {names}", args_text)
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            raise invalid_call(f"of {name} has arguments that are not JSON", args_text) from None
    else:
        parsed = arguments
    if not isinstance(parsed, dict):
        raise invalid_call(f"of {name} has arguments that are not a JSON object", args_text)
    if not isinstance(call_id, str) or not call_id or call_id in taken:
        call_id = new_call_id()
    taken.add(call_id)
    text = arguments if isinstance(arguments, str) else json.dumps(parsed, ensure_ascii=False)
    return ToolCall(call_id, name, text)


def check_required(request: Request, calls: tuple[ToolCall, ...], answer: str) -> None:
    """A completed answer to a request whose tool_choice requires a call must be one."""
    if must_call(request) and not calls:
        raise invalid_call(
            f"never came (tool_choice is {request.tool_choice!r}); the model answered", answer
        )


def parse_mistral(text: str, offered: tuple[Tool, ...], taken: set[str]) -> tuple[ToolCall, ...]:
    """The calls in what the model wrote after `[TOOL_CALLS]` (special tokens left out)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise invalid_call(f"is not JSON ({exc.args[0]})", text) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise invalid_call('is not a list of {"name", "arguments"} objects', text)
    calls = []
    for item in data:
        if not isinstance(item, dict) or "name" not in item:
            raise invalid_call('is not a list of {"name", "arguments"} objects', text)
        arguments = item.get("arguments", {})
        if not isinstance(arguments, dict | str):
            raise invalid_call("has arguments that are not a JSON object", text)
        calls.append(checked_call(item.get("id"), item["name"], arguments, offered, taken))
    return tuple(calls)


@dataclass
class _Part:
    call_id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallParts:
    """OpenAI-style streamed `delta.tool_calls` entries -> whole calls (by `index`).
    `cut_off`: the answer stopped at its token limit (`finish_reason: length`), so a call in
    it is incomplete (vLLM then may have sent only its name, or nothing of a required one)."""

    def __init__(self) -> None:
        self._parts: dict[int, _Part] = {}
        self.cut_off = False

    def __bool__(self) -> bool:
        return bool(self._parts)

    def add(self, entry: dict[str, Any]) -> None:
        index = entry.get("index", 0)
        part = self._parts.setdefault(index if isinstance(index, int) else 0, _Part())
        if isinstance(entry.get("id"), str):
            part.call_id = entry["id"]
        function = entry.get("function") or {}
        if isinstance(function.get("name"), str):
            part.name += function["name"]
        if isinstance(function.get("arguments"), str):
            part.arguments.append(function["arguments"])

    def finish(self, offered: tuple[Tool, ...], taken: set[str]) -> tuple[ToolCall, ...]:
        if self.cut_off:
            produced = " ".join(f"{p.name}({''.join(p.arguments)}" for p in self._parts.values())
            raise invalid_call("was cut off at the answer's token limit", produced)
        return tuple(
            checked_call(p.call_id, p.name, "".join(p.arguments), offered, taken)
            for _, p in sorted(self._parts.items())
        )
