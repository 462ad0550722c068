"""Word chunks -> phrases to speak, as early as they can be spoken well (pure, clock passed in).

Speech starts with the first phrase, not at the end of the answer. A phrase ends at
  - a sentence end (. ! ? … and their CJK forms, closing quotes/brackets allowed after them);
  - a weak boundary (, ; : – — and their CJK forms, or a dash standing alone) once the phrase
    has `min_words` words (`first_min_words` for an answer's first phrase, so speech can start
    after a short clause);
  - the timeout: words pending for `timeout_s` without a boundary are spoken as they are, so a
    long run-on sentence cannot hold back the first audio.
Phrases are deltas like the word chunks they are made of: concatenating every phrase of an
answer gives the text fed in, so every word spoken is a word shown, in order, exactly once.
"""

from __future__ import annotations

import re

_CLOSERS = "\"'”’»)]}」』】"
_SENTENCE_END = re.compile(rf"[.!?…。！？][{re.escape(_CLOSERS)}]*$")
_WEAK = re.compile(rf"([,;:–—、，；：][{re.escape(_CLOSERS)}]*|^[-–—]+)$")


class PhraseChunker:
    def __init__(self, first_min_words: int = 2, min_words: int = 4, timeout_s: float = 0.3):
        if first_min_words < 1 or min_words < 1 or timeout_s <= 0:
            raise ValueError("need first_min_words >= 1, min_words >= 1 and timeout_s > 0")
        self.first_min_words = first_min_words
        self.min_words = min_words
        self.timeout_s = timeout_s
        self._words: list[str] = []
        self._since: float | None = None  # when the oldest pending word arrived
        self._phrases = 0

    @property
    def pending(self) -> str:
        return "".join(self._words)

    def due_at(self) -> float | None:
        """When the pending words time out (same clock as `feed`), None if none pend."""
        return None if self._since is None else self._since + self.timeout_s

    def feed(self, text: str, now: float) -> list[str]:
        """One or more complete words (a word chunk); return the phrases now complete."""
        phrases: list[str] = []
        for word in re.findall(r"\s*\S+\s*", text) if text.strip() else ():
            if not self._words:
                self._since = now
            self._words.append(word)
            token = word.strip()
            needed = self.first_min_words if self._phrases == 0 else self.min_words
            if _SENTENCE_END.search(token) or (_WEAK.search(token) and len(self._words) >= needed):
                phrases.append(self._take())
        return phrases + self.poll(now)

    def poll(self, now: float) -> list[str]:
        """The pending words as a phrase if they have waited `timeout_s`, else nothing."""
        due = self.due_at()
        return [self._take()] if due is not None and now >= due else []

    def flush(self) -> list[str]:
        """The answer ended: whatever pends is the last phrase."""
        return [self._take()] if self._words else []

    def _take(self) -> str:
        phrase = "".join(self._words)
        self._words = []
        self._since = None
        self._phrases += 1
        return phrase
