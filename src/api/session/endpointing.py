"""When a pause ends the turn under `semantic_vad` (pure: no clock, no thread, no model).

The VAD reports a pause the moment speech stops and how much silence has followed; the turn
judge (Smart Turn) says how likely the speaker is to have finished. `eagerness` sets how much
silence the judge is first asked after, how sure it must be, and the longest a turn that does
not sound finished may wait (OpenAI's maxima: 8 s low, 4 s medium, 2 s high; auto = medium).
The judge is asked again every `CHECK_EVERY_MS` of silence: its answer moves with the silence
after the words, and a check that comes too early must not be the last word.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Eagerness:
    threshold: float  # the judge's P(finished) that ends the turn
    first_check_ms: int  # silence before the judge is first asked
    max_wait_ms: int  # silence that ends the turn whatever the judge says


EAGERNESS = {
    "high": Eagerness(0.3, 100, 2000),
    "medium": Eagerness(0.5, 200, 4000),
    "low": Eagerness(0.7, 300, 8000),
}
EAGERNESS["auto"] = EAGERNESS["medium"]
CHECK_EVERY_MS = 100


class PauseWatch:
    """One pause: when to ask the judge, and whether its verdict ends the turn."""

    def __init__(self, eagerness: Eagerness, speech_end: int) -> None:
        self.eagerness = eagerness
        self.speech_end = speech_end  # stream offset where the speech before it ended
        self.asking = False  # a question is with the judge
        self._asked_at_ms: int | None = None
        self.verdicts: list[tuple[int, float]] = []  # (silence ms, P(finished)) so far

    def due(self, silence_ms: int) -> bool:
        """Ask the judge now, `silence_ms` into the pause?"""
        if self.asking or silence_ms < self.eagerness.first_check_ms:
            return False
        return self._asked_at_ms is None or silence_ms - self._asked_at_ms >= CHECK_EVERY_MS

    def asked(self, silence_ms: int) -> None:
        self.asking = True
        self._asked_at_ms = silence_ms

    def answered(self, silence_ms: int, probability: float | None) -> bool:
        """The judge's verdict on the audio up to `silence_ms` into the pause: does it end
        the turn? (None: the judge failed; the silence will end it.)"""
        self.asking = False
        if probability is None:
            return False
        self.verdicts.append((silence_ms, probability))
        return probability >= self.eagerness.threshold
