"""What a truncate keeps: the spoken timeline's words-heard rule against real synthesised speech.

    python benchmarks/truncation.py [--engine espeak|kokoro]

`SpokenTimeline.text_until(ms)` guesses which words an answer's audio had carried by `ms`
(engines give no word timings). Ground truth, approximate: word k of a phrase ends where the
engine's audio for the phrase's first k words alone stops sounding (a prefix said alone is
phrased a little differently). At a quarter and at three quarters into each true word, the
words the rule returns are compared with the words truly done (k, then k+1), for the
timeline's rule and for the plain one it improves on (words in equal shares of the phrase's
whole audio, its silences included). Writes benchmarks/out/truncation.json.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np
from _common import table, write_json

from voxtral_server.api.spoken import LOUD, SpokenTimeline
from voxtral_server.config import Settings
from voxtral_server.models.tts import TtsEngine, load_tts

PHRASES = [
    "Hello world, ",
    "the quick brown fox jumps over the lazy dog. ",
    "Speech starts with the first phrase, not at the end of the answer. ",
    "A phrase ends at a sentence end, ",
    "or at a comma once it has enough words. ",
    "Barge in, and the answer stops within one frame; ",
    "what you heard of it stays in the conversation, nothing more.",
]


def say(tts: TtsEngine, text: str) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.int16), *tts.stream(text.strip())])


def voiced(pcm: np.ndarray) -> tuple[int, int]:
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > LOUD)
    return int(loud[0]), int(loud[-1]) + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=["espeak", "kokoro"], default="espeak")
    args = parser.parse_args(argv)
    tts = load_tts(Settings().with_overrides({("tts", "engine"): args.engine}))
    assert tts is not None
    rate = tts.sample_rate
    timeline = SpokenTimeline(rate)
    spans: list[tuple[int, int, int]] = []  # each phrase: audio start, end, words
    truth: list[tuple[float, int]] = []  # (sample, words truly done by then)
    done = 0
    try:
        for phrase in PHRASES:
            pcm, start = say(tts, phrase), timeline.samples
            timeline.begin(phrase)
            timeline.extend(pcm)
            timeline.close()
            spans.append((start, timeline.samples, len(phrase.split())))
            words = phrase.split()
            prefixes = [" ".join(words[: k + 1]) for k in range(len(words))]
            ends = [start + voiced(say(tts, prefix))[1] for prefix in prefixes]
            bounds = [start + voiced(pcm)[0], *ends]
            for k in range(len(words)):
                a, b = bounds[k], bounds[k + 1]
                truth += [(a + 0.25 * (b - a), done + k), (a + 0.75 * (b - a), done + k + 1)]
            done += len(words)
    finally:
        tts.close()

    def plain(sample: float) -> int:
        heard = 0
        for a, b, n in spans:
            if b <= sample:
                heard += n
                continue
            return heard + sum(1 for k in range(n) if a + (k + 0.5) / n * (b - a) <= sample)
        return heard

    def ours(sample: float) -> int:
        return len(timeline.text_until(sample * 1000 / rate).split())

    rules: dict[str, Callable[[float], int]] = {"timeline (voiced, by characters)": ours}
    rules["plain (equal shares of the audio)"] = plain
    rows, results = [], {}
    for name, rule in rules.items():
        errors = [rule(sample) - words for sample, words in truth]
        result = {
            "points": len(errors),
            "exact": sum(e == 0 for e in errors),
            "off_by_one": sum(abs(e) == 1 for e in errors),
            "worse": sum(abs(e) > 1 for e in errors),
            "mean_error_words": float(np.mean(errors)),
        }
        results[name] = result
        rows.append([name, *result.values()])
    print(table(["rule", "points", "exact", "off by 1", "worse", "mean error (words)"], rows))
    path = write_json("truncation", {"engine": args.engine, "rules": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
