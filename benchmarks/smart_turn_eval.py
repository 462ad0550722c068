"""Smart Turn v3.2 on the labelled Piper sets, offline: P(complete) where it should say yes
and where it should say no, and what one call costs.

    python benchmarks/smart_turn_eval.py [--threads N] [--pause-ms MS]

  complete +N ms   a complete utterance up to its last audible sample, then N ms of silence
                   (N = 0, 100, 200, 300, 600): the judge should say complete (p > 0.5)
  paused @N ms     a paused utterance cut N ms into its mid-sentence pause (N = 100, 200,
                   400): the judge should say incomplete (p <= 0.5)
  paused end +200  the same sentences at their real end, 200 ms of silence after: complete

Per-call latency: every call timed (features + ONNX), on `--threads` intra-op threads (1, as
the server loads it, by default). The sets are synthetic (one Piper voice); Smart Turn was
trained on human speech. Writes benchmarks/out/smart_turn_eval.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np
from _common import machine, pct, table, write_json
from _piper_sets import Clip, complete_set, paused_set

from voxtral_server.models.audio import SAMPLE_RATE
from voxtral_server.models.turn.judge import TurnJudge, load_turn_judge

TRAILING_MS = (0, 100, 200, 300, 600)
INTO_PAUSE_MS = (100, 200, 400)
THRESHOLD = 0.5  # Smart Turn's own: above it the turn is complete


def samples(ms: int) -> int:
    return SAMPLE_RATE * ms // 1000


def until_end(clip: Clip, trailing_ms: int) -> np.ndarray:
    """The clip up to its last audible sample, then `trailing_ms` of digital silence."""
    speech = clip.audio[: clip.labels.speech_end + 1]
    return np.concatenate([speech, np.zeros(samples(trailing_ms), dtype=np.float32)])


def into_pause(clip: Clip, ms: int) -> np.ndarray:
    assert clip.labels.pause_start is not None
    return clip.audio[: clip.labels.pause_start + samples(ms)]


def conditions(complete: list[Clip], paused: list[Clip]) -> dict[str, tuple[bool, list[Any]]]:
    """condition -> (should the judge say complete?, [(clip, audio)])"""
    out: dict[str, tuple[bool, list[Any]]] = {}
    for ms in TRAILING_MS:
        out[f"complete +{ms} ms"] = (True, [(c, until_end(c, ms)) for c in complete])
    for ms in INTO_PAUSE_MS:
        out[f"paused @{ms} ms"] = (False, [(c, into_pause(c, ms)) for c in paused])
    out["paused end +200 ms"] = (True, [(c, until_end(c, 200)) for c in paused])
    return out


def evaluate(judge: TurnJudge, complete: list[Clip], paused: list[Clip]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    latencies: list[float] = []
    for name, (should_complete, cases) in conditions(complete, paused).items():
        probs: dict[str, float] = {}
        for clip, audio in cases:
            t0 = time.perf_counter()
            probs[clip.name] = judge.completeness(audio)
            latencies.append((time.perf_counter() - t0) * 1000)
        values = list(probs.values())
        right = sum((p > THRESHOLD) == should_complete for p in values)
        results[name] = {
            "expect": "complete" if should_complete else "incomplete",
            "right": right,
            "n": len(values),
            "mean_p": float(np.mean(values)),
            "median_p": float(np.median(values)),
            "p": probs,
        }
    return {
        "conditions": results,
        "latency_ms": {
            "n": len(latencies),
            "p50": pct(latencies, 50),
            "p95": pct(latencies, 95),
            "max": max(latencies),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--pause-ms", type=int, help="one pause length for every paused clip (default 400-1000)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    complete, paused = complete_set(), paused_set(pause_ms=args.pause_ms)
    judge = load_turn_judge("smart_turn", threads=args.threads)
    try:
        out = evaluate(judge, complete, paused)
        warmup_ms = getattr(judge, "warmup_ms", None)
    finally:
        judge.close()

    print(f"machine: {machine()}")
    print(f"Smart Turn v3.2, {args.threads} thread(s); Piper joe voice (synthetic speech)")
    rows = [
        [name, r["expect"], f"{r['right']}/{r['n']}", r["median_p"], r["mean_p"]]
        for name, r in out["conditions"].items()
    ]
    print(table(["condition", "should be", "judged right", "median p", "mean p"], rows))
    names = [c.name for c in complete] + [c.name for c in paused]
    per_clip = []
    for name in names:
        row: list[Any] = [name]
        for cond in out["conditions"].values():
            p = cond["p"].get(name)
            row.append("" if p is None else f"{p:.2f}")
        per_clip.append(row)
    heads = ["clip", *(n.replace(" ms", "") for n in out["conditions"])]
    print(table(heads, per_clip))
    lat = out["latency_ms"]
    print(
        f"per call (features + ONNX): p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, "
        f"max {lat['max']:.1f} ms over {lat['n']} calls; warm-up {warmup_ms:.0f} ms"
    )
    path = write_json(
        "smart_turn_eval",
        {
            "threads": args.threads,
            "pause_ms": args.pause_ms,
            "threshold": THRESHOLD,
            "warmup_ms": warmup_ms,
            "labels": {c.name: vars(c.labels) for c in complete + paused},
            **out,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
