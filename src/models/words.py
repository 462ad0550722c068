"""Streamed text -> word chunks, as soon as each word is complete (pure, no clock).

A chunk's text is a delta: concatenating every chunk of an answer gives the answer's text,
so a word keeps the whitespace before it (" world,"). A word is complete once whitespace
follows it. `flush()` releases everything held (the answer ended, or the caller's timeout
fired because text kept arriving without whitespace).
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\s*\S+")


class WordChunker:
    def __init__(self, min_words: int = 1, max_words: int = 1) -> None:
        if not 1 <= min_words <= max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
        self.min_words = min_words
        self.max_words = max_words
        self._pending = ""
        self._started = False

    @property
    def pending(self) -> str:
        """Text received but not yet released."""
        return self._pending

    def feed(self, text: str) -> list[str]:
        """Add streamed text; return the chunks that are now complete."""
        self._pending += text
        return self._take(final=False)

    def flush(self, end: bool = True) -> list[str]:
        """Release every word held, complete or not.

        `end=True`: the text is over; trailing whitespace is dropped. `end=False` (a
        timeout): trailing whitespace stays held, to lead the next word.
        """
        kept = ""
        if not end:
            body = self._pending.rstrip()
            kept = self._pending[len(body) :]
            self._pending = body
        chunks = self._take(final=True)
        self._pending = kept
        return chunks

    def _take(self, final: bool) -> list[str]:
        # Matches are contiguous from offset 0 (`\s*` absorbs the gaps).
        words: list[str] = []
        for match in _WORD.finditer(self._pending):
            if not final and match.end() == len(self._pending):
                break  # no whitespace after it yet: the word may continue
            words.append(match.group())
        chunks: list[str] = []
        while words and (final or len(words) >= self.min_words):
            take = min(self.max_words, len(words))
            chunks.append("".join(words[:take]))
            words = words[take:]
        released = sum(len(c) for c in chunks)
        self._pending = "" if final else self._pending[released:]
        if chunks and not self._started:
            chunks[0] = chunks[0].lstrip()  # an answer does not start with whitespace
            self._started = True
        return [c for c in chunks if c]
