"""The conversation of a session: its items (messages, function calls and their outputs),
in order, and the history the model reads from them."""

from __future__ import annotations

from collections import deque

import numpy as np

from ...models.types import Message


class Conversation:
    """The last `max_turns` exchanges of a chat, oldest first (older ones are dropped)."""

    def __init__(self, max_turns: int) -> None:
        self._turns: deque[tuple[Message, Message]] = deque(maxlen=max_turns)

    def add(self, audio: np.ndarray, answer: str) -> None:
        if self._turns.maxlen:
            self._turns.append((Message("user", audio=audio), Message("assistant", answer)))

    def clear(self) -> None:
        self._turns.clear()

    def drop_last(self) -> None:
        """Forget the newest exchange (its answer was taken back)."""
        if self._turns:
            self._turns.pop()

    @property
    def history(self) -> tuple[Message, ...]:
        return tuple(m for turn in self._turns for m in turn)
