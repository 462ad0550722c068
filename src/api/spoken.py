"""Which words an answer's audio carries where: its phrases laid out on the audio it produced.

`Speech` records each phrase as its audio is written (`begin`, `extend`, `close`), in sample
offsets at the audio out's rate from the answer's first sample; the audio out counts samples
as they leave (`sent`). The timeline is a plain object that outlives the speech, so the
conversation can keep it on the assistant item: a `conversation.item.truncate` at
`audio_end_ms` keeps `text_until(audio_end_ms)` of the item's text.

The rule of `text_until(ms)`: every phrase whose audio ends by `ms` is heard whole; in the
phrase playing at `ms`, a word is heard once the audio has reached its middle. A phrase's
words are laid over its voiced part (from its first to its last sample louder than -40 dBFS:
engines pad phrases with silence, 150-300 ms at the end with espeak-ng) in proportion to
their characters (plus one for the gap after each word), as engines give no word timings.
A phrase cut short by a cancel is laid over the length it would have had at the pace of the
answer's whole phrases (or `DEFAULT_MS_PER_CHAR` if none is whole yet). The text returned is
always a prefix of `text`, and grows with `ms`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

LOUD = 328  # int16 amplitude (-40 dBFS) above which a sample counts as voiced
# Pace of a phrase with no whole phrase to measure against: espeak-ng's default voice speaks
# "the quick brown fox jumps over the lazy dog." (44 characters + 9 gaps) in 2.6 s voiced.
DEFAULT_MS_PER_CHAR = 50.0
_WORD = re.compile(r"\s*\S+\s*")  # as models/phrases.py splits words: nothing is lost
# A ms value read back from `duration_ms` lands on its sample despite float rounding.
_EPSILON = 1e-6  # samples


def _weight(word: str) -> int:
    return len(word.strip()) + 1


@dataclass
class _Phrase:
    text: str
    start: int  # its first sample in the answer's audio
    end: int  # one past its last sample written so far
    whole: bool = False  # its synthesis finished (False: under way, or cut short)
    voiced: tuple[int, int] | None = None  # first and one-past-last loud sample (absolute)
    words: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.words = _WORD.findall(self.text)

    @property
    def weight(self) -> int:
        return sum(_weight(w) for w in self.words)

    def heard(self, point: float, samples_per_weight: float) -> str:
        """The words of this phrase heard by answer sample `point` (it plays at `point`)."""
        start, end = self.voiced if self.voiced is not None else (self.start, self.end)
        total = self.weight
        if not self.whole:  # cut short: as long as its words would have taken
            end = max(end, start + round(total * samples_per_weight))
        heard = []
        done = 0
        for word in self.words:
            middle = start + (done + _weight(word) / 2) / total * (end - start)
            if middle > point:
                break
            heard.append(word)
            done += _weight(word)
        if len(heard) < len(self.words):
            return "".join(heard)
        return self.text  # whole: with any leading or trailing whitespace


class SpokenTimeline:
    """One answer's phrases on its audio (sample offsets at `rate`), and how much went out."""

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self.samples = 0  # audio produced (written to the audio out) so far
        self.sent_samples = 0  # of which the audio out has sent
        self._phrases: list[_Phrase] = []

    # ----------------------------------------------------------------- from the speech

    def begin(self, text: str) -> None:
        """The next phrase: its audio starts after everything produced so far."""
        self._phrases.append(_Phrase(text, self.samples, self.samples))

    def extend(self, pcm: np.ndarray) -> None:
        """More audio (int16) of the current phrase."""
        if not pcm.size:
            return
        if self._phrases:
            phrase = self._phrases[-1]
            loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > LOUD)
            if loud.size:
                first, last = self.samples + int(loud[0]), self.samples + int(loud[-1]) + 1
                phrase.voiced = (first if phrase.voiced is None else phrase.voiced[0], last)
            phrase.end = self.samples + pcm.size
        self.samples += pcm.size

    def close(self) -> None:
        """The current phrase's audio is complete."""
        if self._phrases:
            self._phrases[-1].whole = True

    def sent(self, count: int) -> None:
        """The audio out sent `count` more samples of this answer."""
        self.sent_samples += count

    # ----------------------------------------------------------------- for the conversation

    @property
    def duration_ms(self) -> float:
        """The answer's audio produced so far, exactly (a truncate past it is an error)."""
        return self.samples * 1000 / self.rate

    @property
    def sent_ms(self) -> float:
        return self.sent_samples * 1000 / self.rate

    @property
    def text(self) -> str:
        """Every phrase whose audio was begun, in order."""
        return "".join(p.text for p in self._phrases)

    def text_until(self, audio_end_ms: float) -> str:
        """The words heard by `audio_end_ms` into the answer's audio (the rule is in the
        module's docstring); past `duration_ms`, every phrase produced."""
        if not audio_end_ms >= 0:  # also NaN
            raise ValueError(f"audio_end_ms must be >= 0, got {audio_end_ms}")
        point = audio_end_ms * self.rate / 1000 + _EPSILON
        heard = []
        for phrase in self._phrases:
            if phrase.whole and phrase.end <= point:
                heard.append(phrase.text)
                continue
            heard.append(phrase.heard(point, self._samples_per_weight()))
            break
        return "".join(heard)

    def heard_ms(self, unplayed_ms: float) -> int:
        """How far into the answer's audio the listener is (ms, rounded down): what was sent,
        less `unplayed_ms` the client holds but has not played yet."""
        heard = min(self.sent_ms - unplayed_ms, self.duration_ms)
        return max(0, math.floor(heard))

    def _samples_per_weight(self) -> float:
        voiced = weight = 0
        for phrase in self._phrases:
            if phrase.whole and phrase.voiced is not None and phrase.words:
                voiced += phrase.voiced[1] - phrase.voiced[0]
                weight += phrase.weight
        if weight:
            return voiced / weight
        return DEFAULT_MS_PER_CHAR * self.rate / 1000
