"""When a pause ends the turn under `semantic_vad` (pure: no clock, no thread, no model).

The VAD reports a pause the moment speech stops (64 ms of silence) and how much silence has
followed; the turn judge (Smart Turn) says how likely the speaker is to have finished. It is
asked at the pause, then again every `CHECK_EVERY_MS` of silence (its answer moves with the
silence after the words: a check that comes too early must not be the last word). The turn
ends at the first verdict at or above `threshold`, or after `max_wait_ms` of silence
whatever the judge says. `eagerness`:

  high     P >= 0.3, at most 2 s     (OpenAI's maximum waits: 2 s high, 4 s medium, 8 s low)
  medium   P >= 0.5, at most 4 s
  low      P >= 0.7, first asked after 200 ms, at most 8 s
  auto     P >= 0.5, at most 250 ms: the default, chosen by measurement (RESULTS.md). Answer
           fast, repair when wrong: a finished sentence the judge misreads (it cannot read
           synthetic espeak speech at all) waits at most 250 ms, and a sentence that goes on
           after an early end is revised by the session (the answer is taken back and the
           turn continues as one), so the cost of ending early is a retraction, not two
           turns.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Eagerness:
    threshold: float  # the judge's P(finished) that ends the turn
    first_check_ms: int  # silence before the judge is first asked
    max_wait_ms: int  # silence that ends the turn whatever the judge says


EAGERNESS = {
    "high": Eagerness(0.3, 0, 2000),
    "medium": Eagerness(0.5, 0, 4000),
    "low": Eagerness(0.7, 200, 8000),
    "auto": Eagerness(0.5, 0, 250),
}
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
