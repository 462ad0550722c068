"""Reduced log-mel vs the processor's feature extractor: speed and exactness.

    python benchmarks/mel.py [--model DIR_OR_HUB_ID] [--device cpu|cuda] [--reps N]

The processor column is what the stock pipeline runs: pad to 30 s, then WhisperFeatureExtractor
over every window (on the CPU, as the processor does by default). Ours runs on --device.
Writes benchmarks/out/mel.json and mel.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import OUT, machine, median, table, write_json

from voxtral_server.models.mel import LogMel, processor_features


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, reps: int, device: torch.device) -> list[float]:  # type: ignore[no-untyped-def]
    fn()  # first call allocates; not what a warm server sees
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="processor source (default: a tiny checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--seconds", type=float, nargs="+", default=[1, 3, 10, 30])
    args = parser.parse_args()

    from transformers import AutoProcessor

    if args.model is None:
        from voxtral_server.models.tiny import build_tiny

        args.model = str(build_tiny(Path(tempfile.mkdtemp()) / "tiny"))
    fe = AutoProcessor.from_pretrained(args.model).feature_extractor
    device = torch.device(args.device)
    mel = LogMel(np.asarray(fe.mel_filters), device)
    rng = np.random.default_rng(0)
    rows, results = [], []
    for seconds in args.seconds:
        audio = (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
        audio = np.round(audio * 32768) / 32768
        audio = audio.astype(np.float32)
        ref = timed(lambda a=audio: processor_features(fe, a), args.reps, torch.device("cpu"))
        ours = timed(lambda a=audio: mel(a), args.reps, device)
        diff = (mel(audio).cpu() - processor_features(fe, audio)).abs().max().item()
        r = {
            "seconds": seconds,
            "processor_ms": median(ref),
            "reduced_ms": median(ours),
            "speedup": median(ref) / median(ours),
            "max_abs_diff": diff,
        }
        results.append(r)
        rows.append(
            [
                f"{seconds:g} s",
                r["processor_ms"],
                r["reduced_ms"],
                f"{r['speedup']:.1f}x",
                f"{diff:.1e}",
            ]
        )
    print(f"machine: {machine()}  device: {device}  reps: {args.reps} (medians)")
    print(table(["clip", "processor ms", "reduced ms", "speedup", "max abs diff"], rows))
    path = write_json("mel", {"device": str(device), "reps": args.reps, "results": results})
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = np.arange(len(results))
        ax.bar(x - 0.2, [r["processor_ms"] for r in results], 0.4, label="processor (30 s windows)")
        ax.bar(x + 0.2, [r["reduced_ms"] for r in results], 0.4, label=f"reduced ({device})")
        ax.set_xticks(x, [f"{r['seconds']:g} s" for r in results])
        ax.set_ylabel("median ms")
        ax.set_title("log-mel features per utterance")
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "mel.png", dpi=110)
        print(f"wrote {OUT / 'mel.png'}")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
