"""Engine latency: first token, first word chunk, tokens/s, cancel, first request vs steady.

    python benchmarks/engine.py [--model DIR_OR_HUB_ID] [--audio FILE] [--turns N]

Runs two engines one after the other in the same process on the same audio:
  seed      the original system's behaviour: 6-word chunks, processor features, no warm-up;
  ours      this server's defaults: 1-word chunks, reduced mel, warm-up at load.
With no --model it builds a tiny scripted checkpoint (real architecture, random weights,
a 48-word answer), so it runs offline on a CPU; on a GPU host pass the real model id.
Writes benchmarks/out/engine.json and engine.png.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import OUT, machine, median, pct, table, write_json

from voxtral_server.config import Settings, load_settings
from voxtral_server.models.audio import read_audio_file
from voxtral_server.models.types import Chunk, Request
from voxtral_server.models.voxtral import VoxtralEngine

ANSWER = (
    "Paris is mild today, with a light breeze from the west and a few clouds in the "
    "afternoon. Expect around eighteen degrees, a little rain after sunset, and a clear, "
    "cool morning tomorrow, so a light jacket should be enough if you go out early."
)
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "seed": {
        "chunked_response": {"min_words_per_chunk": 6, "max_words_per_chunk": 6},
        "model": {"mel": "processor", "warmup_runs": 0},
    },
    "ours": {},
}


def settings_for(base: Settings, variant: str) -> Settings:
    data = base.model_dump()
    for section, values in VARIANTS[variant].items():
        data[section].update(values)
    return Settings.model_validate(data)


def run_turn(engine: VoxtralEngine, request: Request, cancel: bool = False) -> dict[str, Any]:
    stream = engine.stream(request)
    chunks: list[Chunk] = []
    for chunk in stream:
        if cancel and not chunks:
            stream.cancel()
        chunks.append(chunk)
    final = chunks[-1].totals
    assert final is not None
    first_word = chunks[0].processing_time_ms if not chunks[0].is_final else float("nan")
    return {
        "ttft_ms": chunks[0].first_token_latency_ms,
        "first_chunk_ms": first_word,
        "total_ms": final.total_ms,
        "tokens_per_s": final.tokens_per_s,
        "tokens": final.tokens,
        "status": final.status,
        "cancel_latency_ms": final.cancel_latency_ms,
        "tokens_after_cancel": final.tokens_after_cancel,
    }


def measure(settings: Settings, request: Request, turns: int, cancels: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    engine = VoxtralEngine.load(settings)
    load_ms = (time.perf_counter() - t0) * 1000
    try:
        first = run_turn(engine, request)
        steady = [run_turn(engine, request) for _ in range(turns)]
        cancelled = [run_turn(engine, request, cancel=True) for _ in range(cancels)]
    finally:
        engine.close()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    def col(rows: list[dict[str, Any]], key: str) -> list[float]:
        return [r[key] for r in rows if r[key] is not None and r[key] == r[key]]

    return {
        "load_and_warmup_ms": load_ms,
        "first_request": first,
        "steady": {
            key: {"p50": median(col(steady, key)), "p95": pct(col(steady, key), 95)}
            for key in ("ttft_ms", "first_chunk_ms", "total_ms", "tokens_per_s")
        },
        "cancel_latency_ms": {
            "p50": median(col(cancelled, "cancel_latency_ms")),
            "p95": pct(col(cancelled, "cancel_latency_ms"), 95),
        },
        "max_tokens_after_cancel": max(col(cancelled, "tokens_after_cancel"), default=None),
        "turns": steady,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="hub id or folder (default: a tiny scripted checkpoint)")
    parser.add_argument("--config", type=Path, help="config file (default: ./config.yaml)")
    parser.add_argument(
        "--audio", type=Path, default=Path(__file__).parent.parent / "static" / "sample.wav"
    )
    parser.add_argument("--mode", choices=["chat", "transcribe"], default="chat")
    parser.add_argument("--turns", type=int, default=20, help="steady-state requests per engine")
    parser.add_argument("--cancels", type=int, default=10, help="cancelled requests per engine")
    parser.add_argument("--min-new-tokens", type=int, default=0, help="for random models")
    args = parser.parse_args()

    if args.model is None:
        from voxtral_server.models.tiny import build_tiny

        args.model = str(build_tiny(Path(tempfile.mkdtemp()) / "tiny", script=ANSWER))
    base = load_settings(args.config, {("model", "id"): args.model})
    audio = read_audio_file(args.audio)
    request = Request(audio, args.mode, min_new_tokens=args.min_new_tokens)

    results = {
        v: measure(settings_for(base, v), request, args.turns, args.cancels) for v in VARIANTS
    }
    seed, ours = results["seed"], results["ours"]
    ratio_steady = seed["steady"]["first_chunk_ms"]["p50"] / ours["steady"]["first_chunk_ms"]["p50"]
    ratio_first = seed["first_request"]["first_chunk_ms"] / ours["first_request"]["first_chunk_ms"]

    rows = []
    for name, r in results.items():
        s = r["steady"]
        rows.append([
            name, r["load_and_warmup_ms"], r["first_request"]["ttft_ms"],
            r["first_request"]["first_chunk_ms"], s["ttft_ms"]["p50"], s["ttft_ms"]["p95"],
            s["first_chunk_ms"]["p50"], s["first_chunk_ms"]["p95"], s["tokens_per_s"]["p50"],
            r["cancel_latency_ms"]["p50"], r["cancel_latency_ms"]["p95"],
        ])  # fmt: skip
    print(f"machine: {machine()}")
    seconds = len(audio) / 16000
    print(f"model: {args.model}  mode: {args.mode}  audio: {args.audio.name} ({seconds:.1f} s)")
    print(f"steady state over {args.turns} requests, cancel over {args.cancels}; times in ms")
    print(table(
        ["engine", "load+warm", "1st req ttft", "1st req 1st chunk", "ttft p50", "ttft p95",
         "1st chunk p50", "1st chunk p95", "tok/s p50", "cancel p50", "cancel p95"],
        rows,
    ))  # fmt: skip
    print(f"first chunk, seed / ours: steady p50 {ratio_steady:.1f}x, ", end="")
    print(f"first request {ratio_first:.1f}x")
    print(f"tokens generated after cancel(): at most {ours['max_tokens_after_cancel']}")
    targets = base.performance_targets
    for label, value, target in (
        ("TTFT p95", ours["steady"]["ttft_ms"]["p95"], targets.ttft_ms),
        ("Total p95", ours["steady"]["total_ms"]["p95"], targets.total_latency_ms),
    ):
        verdict = "PASS" if value <= target else "FAIL"
        print(f"• {label}: {value:.1f} ms (target ≤ {target:g} ms) — {verdict}")
    for r in results.values():
        r.pop("turns")
    path = write_json("engine", {
        "model": args.model, "mode": args.mode, "turns": args.turns, "results": results,
        "first_chunk_ratio_steady": ratio_steady, "first_chunk_ratio_first_request": ratio_first,
    })  # fmt: skip
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [
            "first request\nTTFT",
            "first request\n1st chunk",
            "steady p50\nTTFT",
            "steady p50\n1st chunk",
        ]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        x = np.arange(len(labels))
        for i, (name, r) in enumerate(results.items()):
            first, steady = r["first_request"], r["steady"]
            vals = [first["ttft_ms"], first["first_chunk_ms"]]
            vals += [steady["ttft_ms"]["p50"], steady["first_chunk_ms"]["p50"]]
            ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, label=name)
        ax.set_xticks(x, labels)
        ax.set_ylabel("ms")
        ax.set_title("time to first token and first word chunk")
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "engine.png", dpi=110)
        print(f"wrote {OUT / 'engine.png'}")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
