"""The conversation of a session: its items (messages, function calls and their outputs) in
order, as OpenAI's Realtime API shows them, and the history the model reads from them.

Items come from the user's committed audio, from `conversation.item.create` and from the
model's answers. `Conversation.history()` turns the last `max_turns` user turns (and every
item after the first of them) into the engine's `Message`s; system messages always count.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from ...models.types import Message, ToolCall
from .. import protocol as p
from ..spoken import SpokenTimeline

ItemType = Literal["message", "function_call", "function_call_output"]
ItemStatus = Literal["completed", "incomplete", "in_progress"]
Role = Literal["user", "assistant", "system"]
MAX_ID_CHARS = 64


@dataclass(eq=False)
class Item:
    id: str
    type: ItemType
    role: Role | None = None
    text: str = ""  # user/system: input_text; assistant: the answer's text (as heard)
    audio: np.ndarray | None = None  # user: what was said, 16 kHz mono float32
    transcript: str | None = None  # user audio: its transcription, once made
    spoken: bool = False  # assistant: an audio answer (output_audio) rather than text
    status: ItemStatus = "completed"
    call_id: str | None = None  # function_call / function_call_output
    name: str | None = None  # function_call
    arguments: str = ""  # function_call: JSON text
    output: str = ""  # function_call_output
    timeline: SpokenTimeline | None = None  # assistant audio: which words each stretch carries

    def wire(self) -> dict[str, Any]:
        """The item as the Realtime API shows it (`conversation.item.*`, `response.output`)."""
        item: dict[str, Any] = {
            "id": self.id,
            "object": "realtime.item",
            "type": self.type,
            "status": self.status,
        }
        if self.type == "function_call":
            item.update(call_id=self.call_id, name=self.name, arguments=self.arguments)
        elif self.type == "function_call_output":
            item.update(call_id=self.call_id, output=self.output)
        else:
            item.update(role=self.role, content=self._content())
        return item

    def _content(self) -> list[dict[str, Any]]:
        if self.role == "assistant":
            if self.spoken:
                return [{"type": "output_audio", "transcript": self.text}]
            return [{"type": "output_text", "text": self.text}]
        parts: list[dict[str, Any]] = []
        if self.audio is not None:
            parts.append({"type": "input_audio", "transcript": self.transcript})
        if self.text or self.role == "system" or self.audio is None:
            parts.append({"type": "input_text", "text": self.text})
        return parts

    def message(self) -> Message | None:
        """What the model reads of this item (None: nothing, e.g. an empty answer)."""
        if self.type == "function_call_output":
            return Message("tool", self.output, call_id=self.call_id)
        if self.type == "function_call":
            call = ToolCall(self.call_id or self.id, self.name or "", self.arguments)
            return Message("assistant", tool_calls=(call,))
        if self.role == "assistant":
            return Message("assistant", self.text) if self.text.strip() else None
        if self.role == "system":
            return Message("system", self.text)
        return Message("user", self.text, self.audio)


class Conversation:
    """The items of one session's default conversation, oldest first.

    At most `max_items` are kept (the oldest go first); the model reads the items from the
    `max_turns`-th last user message on (`history`), plus every system message.
    """

    def __init__(self, max_turns: int, max_items: int) -> None:
        self.max_turns = max_turns
        self.max_items = max_items
        self._items: list[Item] = []

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> tuple[Item, ...]:
        return tuple(self._items)

    @property
    def last_id(self) -> str | None:
        return self._items[-1].id if self._items else None

    def get(self, item_id: str) -> Item | None:
        return next((i for i in self._items if i.id == item_id), None)

    def find(self, item_id: str, event_id: str | None = None) -> Item:
        item = self.get(item_id)
        if item is None:
            raise p.ProtocolError(
                "item_not_found", f"no item {item_id!r} in the conversation", event_id
            )
        return item

    def previous_id(self, item: Item) -> str | None:
        i = self._items.index(item)
        return self._items[i - 1].id if i else None

    def add(self, item: Item, previous_item_id: str | None = None) -> str | None:
        """Insert after `previous_item_id` ("root": first; None: last); returns the id of the
        item before it. Raises `ProtocolError` for a taken id or an unknown previous id."""
        if self.get(item.id) is not None:
            raise p.ProtocolError("item_id_exists", f"an item {item.id!r} already exists")
        if previous_item_id is None:
            at = len(self._items)
        elif previous_item_id == "root":
            at = 0
        else:
            previous = self.get(previous_item_id)
            if previous is None:
                raise p.ProtocolError(
                    "previous_item_not_found",
                    f"previous_item_id {previous_item_id!r} is not in the conversation",
                )
            at = self._items.index(previous) + 1
        self._items.insert(at, item)
        del self._items[: max(0, len(self._items) - self.max_items)]
        return self._items[at - 1].id if at > 0 and item in self._items else None

    def delete(self, item_id: str) -> Item | None:
        item = self.get(item_id)
        if item is not None:
            self._items.remove(item)
        return item

    def clear(self) -> None:
        self._items.clear()

    def history(self) -> tuple[Message, ...]:
        """What the model reads: the last `max_turns` user turns and all that follows the
        first of them (the newest user turn always), plus every system message."""
        users = [i for i, item in enumerate(self._items) if item.role == "user"]
        keep = self.max_turns + 1
        start = users[-keep] if len(users) >= keep else 0
        chosen = [item for i, item in enumerate(self._items) if i >= start or item.role == "system"]
        return messages(chosen)


def messages(items: Iterable[Item]) -> tuple[Message, ...]:
    """The model's messages for these items (a function call joins the assistant message
    just before it)."""
    out: list[Message] = []
    for item in items:
        message = item.message()
        if message is None:
            continue
        last = out[-1] if out else None
        if message.tool_calls and last is not None and last.role == "assistant":
            out[-1] = replace(last, tool_calls=last.tool_calls + message.tool_calls)
        else:
            out.append(message)
    return tuple(out)


# ------------------------------------------------------------------ items from the client

AudioDecoder = Callable[[str], np.ndarray]


def from_client(
    param: p.ItemParam, decode: AudioDecoder, new_id: str, event_id: str | None
) -> Item:
    """A client's item (`conversation.item.create`, `response.create`'s input) checked and
    converted; `ProtocolError` names what is wrong."""

    def bad(message: str, code: str = "invalid_item") -> p.ProtocolError:
        return p.ProtocolError(code, message, event_id)

    item_id = param.id or new_id
    if len(item_id) > MAX_ID_CHARS:
        raise bad(f"item.id is longer than {MAX_ID_CHARS} characters")
    if param.type == "function_call":
        if not param.name:
            raise bad("a function_call item needs a name")
        arguments = param.arguments or "{}"
        _check_json(arguments, "function_call arguments", bad)
        return Item(
            item_id, "function_call", call_id=param.call_id or item_id, name=param.name,
            arguments=arguments,
        )  # fmt: skip
    if param.type == "function_call_output":
        if not param.call_id:
            raise bad("a function_call_output item needs the call_id of its function_call")
        return Item(item_id, "function_call_output", call_id=param.call_id, output=param.output)
    if param.type != "message":
        raise bad(f"item.type {param.type!r} cannot be created here")
    if param.role is None:
        raise bad("a message item needs a role: user, assistant or system")
    if not param.content:
        raise bad("a message item needs content")
    allowed = {
        "user": ("input_text", "input_audio"),
        "system": ("input_text",),
        "assistant": ("output_text", "text", "output_audio"),
    }[param.role]
    texts: list[str] = []
    audios: list[np.ndarray] = []
    for i, part in enumerate(param.content):
        if part.type == "input_image":
            raise bad("images are not supported: Voxtral reads text and audio", "unsupported")
        if part.type not in allowed:
            raise bad(
                f"content[{i}].type {part.type!r} is not allowed in a {param.role} message "
                f"(allowed: {', '.join(allowed)})"
            )
        if part.type == "input_audio":
            if not part.audio:
                raise bad(f"content[{i}] (input_audio) has no audio")
            audios.append(decode(part.audio))
        elif part.type == "output_audio":
            texts.append(part.transcript or "")
        else:
            texts.append(part.text or "")
    audio = np.concatenate(audios) if audios else None
    return Item(
        item_id, "message", param.role, "".join(texts) if param.role == "assistant"
        else "\n".join(t for t in texts if t), audio, spoken=param.role == "assistant"
        and any(part.type == "output_audio" for part in param.content),
    )  # fmt: skip


def _check_json(text: str, what: str, bad: Callable[[str], p.ProtocolError]) -> None:
    try:
        json.loads(text)
    except ValueError as exc:
        raise bad(f"{what} are not valid JSON: {exc}") from None
