"""Multi-turn chat: model TTFT turn after turn, with the audio encoder cache and without.

    python benchmarks/history.py [--model DIR_OR_HUB_ID] [--audio FILE] [--conversations N]
                                 [--max-batch N]

A chat sends its last `conversation.max_turns` exchanges (their audio included) with every
new turn. Without the cache the audio encoder re-reads all of it each time, so TTFT grows
turn after turn; with it (`models/embeds.py`) each utterance is encoded once. One engine,
the same conversations run alternately with the cache on and off (off = an always-empty
cache), in one process. With no --model, a tiny scripted checkpoint (offline, CPU).
--max-batch 1 runs the serial worker; above 1 (continuous batching) a turn also reuses the
KV cache row its conversation's previous turn left (`models/voxtral/prefix.py`), so with
the cache both the encoder and most of the prefill are skipped.
Writes benchmarks/out/history.json and history.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import OUT, machine, median, pct, table, write_json

from voxtral_server.config import load_settings
from voxtral_server.models.audio import read_audio_file
from voxtral_server.models.types import Message, Request
from voxtral_server.models.voxtral import VoxtralEngine
from voxtral_server.models.voxtral.embeds import AudioEmbedCache

TURNS = 6  # the 5th and later turns carry the full history (conversation.max_turns = 4)


class NoCache(AudioEmbedCache):
    """Every lookup misses: the engine re-encodes all the audio, as before the cache."""

    def get(self, audio: Any) -> None:
        return None


def conversation(engine: VoxtralEngine, audio: Any, max_turns: int) -> list[float]:
    """Model TTFT (ms) of each turn of one conversation; each turn is a new utterance."""
    history: list[Message] = []  # the last max_turns exchanges, oldest first
    ttfts = []
    for _ in range(TURNS):
        utterance = audio.copy()  # a new array per turn, as a new recording would be
        request = Request(utterance, "chat", history=tuple(history), max_new_tokens=8)
        final = list(engine.stream(request))[-1].totals
        assert final is not None and final.model_ttft_ms is not None, final
        ttfts.append(final.model_ttft_ms)
        history += [Message("user", audio=utterance), Message("assistant", final.answer)]
        del history[: max(0, len(history) - 2 * max_turns)]
    return ttfts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--model", help="hub id or folder (default: a tiny scripted checkpoint)")
    parser.add_argument(
        "--audio", type=Path, default=Path(__file__).parent.parent / "static" / "sample.wav"
    )
    parser.add_argument("--conversations", type=int, default=5)
    parser.add_argument("--max-batch", type=int, help="engine.max_batch (default: config)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="history-") as tmp:
        model = args.model
        if model is None:
            from voxtral_server.models.tiny import build_tiny

            model = str(build_tiny(Path(tmp) / "tiny", script="Sure, here is my answer."))
        settings = load_settings(
            None, {("model", "id"): model, ("engine", "max_batch"): args.max_batch}
        )
        audio = read_audio_file(args.audio)
        engine = VoxtralEngine.load(settings)
        cached, plain = engine._embeds, NoCache(1)
        results: dict[str, list[list[float]]] = {"cache": [], "no cache": []}
        try:
            for _ in range(args.conversations):  # alternate, so drift hits both alike
                for name, cache in (("cache", cached), ("no cache", plain)):
                    engine._embeds = cache
                    results[name].append(
                        conversation(engine, audio, settings.conversation.max_turns)
                    )
        finally:
            engine.close()
    rows = []
    summary: dict[str, Any] = {}
    for turn in range(TURNS):
        on = [c[turn] for c in results["cache"]]
        off = [c[turn] for c in results["no cache"]]
        summary[f"turn {turn + 1}"] = {
            "cache_p50": median(on),
            "no_cache_p50": median(off),
            "ratio": median(off) / median(on),
        }
        rows.append(
            [
                turn + 1,
                min(turn, settings.conversation.max_turns),
                median(off),
                pct(off, 95),
                median(on),
                pct(on, 95),
                f"{median(off) / median(on):.2f}x",
            ]
        )
    print(f"machine: {machine()}")
    print(
        f"model: {args.model or 'tiny scripted checkpoint'}  audio: {args.audio.name}  "
        f"engine.max_batch: {settings.engine.max_batch}"
    )
    print(f"{args.conversations} conversations of {TURNS} turns each way; model TTFT in ms")
    headers = ["turn", "history turns", "no cache p50", "p95", "cache p50", "p95", "no/with"]
    print(table(headers, rows))
    path = write_json("history", {"machine": machine(), "summary": summary, "raw": results})
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = list(range(1, TURNS + 1))
        for name in ("no cache", "cache"):
            ax.plot(x, [median([c[t] for c in results[name]]) for t in range(TURNS)], "o-")
        ax.legend(["no cache", "encoder cache"])
        ax.set_xlabel("turn of the conversation")
        ax.set_ylabel("model TTFT p50 (ms)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(OUT / "history.png", dpi=110)
        print(f"wrote {OUT / 'history.png'}")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
