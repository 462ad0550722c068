"""Soak: many turns over many sessions. Is any turn lost, is the engine fair, does anything leak?

    python benchmarks/soak.py [--turns 1000] [--sessions 32] [--fuzz N]

Starts the real app in this process on a tiny scripted checkpoint (twice: without speech out,
then with espeak-ng speech out when it is installed; the turns are split between the two),
opens `--sessions` WebSocket sessions at once, half with server VAD (they stream the clip
and its trailing silence; the server ends the turn and answers by itself) and half
push-to-talk (append, commit, response.create). Every session keeps taking turns until the
run's total reaches `--turns`, so a fast session takes more: the spread of turns per session
shows how fair admission is. Reports:

  lost          turns whose response.done never came (or came failed/cancelled)
  errors        `error` events by code
  turns/session min, max and max/min (target <= 1.3)
  queue wait    p50 / p99 / max of timings.queue_wait_ms, and the bound
                sessions x (median turn time) + 1 s that no turn may exceed
  RSS/fds/threads of this process before the run and after every session has closed
  RSS every `--rss-every` turns, in the JSON and plotted in benchmarks/out/soak_rss.png;
                and after each phase, after gc + malloc_trim: live memory vs allocator cache

With `--fuzz N`, each session first sends N mutated events (valid events with keys replaced
by junk, and non-JSON text) before its turns, and its turns must still complete (the
hypothesis fuzz in tests/test_fuzz.py goes further, with `VOXTRAL_FUZZ_EXAMPLES` for a long
run). Writes benchmarks/out/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import websockets
from _clients import appends, with_16k_input
from _common import pct, table, write_json

from voxtral_server.api.app import create_app
from voxtral_server.api.inprocess import InProcessServer
from voxtral_server.config import Settings
from voxtral_server.models.audio import read_audio_file
from voxtral_server.models.tiny import build_tiny

REPO = Path(__file__).resolve().parent.parent
CLIP = REPO / "static" / "sample.wav"
SCRIPT = "Hello! This is the soak answer."
TURN_TIMEOUT_S = 120.0


def resources() -> dict[str, float]:
    status = Path("/proc/self/status").read_text().splitlines()
    rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
    return {
        "rss_mb": rss,
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
    }


def trimmed_rss_mb() -> float:
    """RSS after a full gc and glibc's malloc_trim(0): what live objects still hold, without
    the freed memory the allocator keeps in its arenas (NaN off glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return float("nan")
    return resources()["rss_mb"]


class Run:
    def __init__(self, total: int, rss_every: int = 50) -> None:
        self.total = total
        self.rss_every = rss_every
        self.rss: list[tuple[int, float]] = []  # (turns completed, RSS MB) as the run goes
        self.started = 0
        self.completed: Counter[str] = Counter()  # per session
        self.lost = 0
        self.errors: Counter[str] = Counter()  # during turns
        self.fuzz_errors: Counter[str] = Counter()  # answers to the fuzzed events
        self.queue_wait_ms: list[float] = []
        self.turn_ms: list[float] = []  # engine time of a turn: model TTFT + generation

    def finished(self, name: str) -> None:
        self.completed[name] += 1
        done = sum(self.completed.values())
        if done % self.rss_every == 0:
            self.rss.append((done, resources()["rss_mb"]))

    def take(self) -> bool:
        if self.started >= self.total:
            return False
        self.started += 1
        return True


def mutated_events(count: int, rng: random.Random) -> list[str]:
    valid: list[dict[str, Any]] = [
        {"type": "session.update", "session": {"instructions": "x"}},
        {"type": "input_audio_buffer.append", "audio": "AAAA"},
        {"type": "response.cancel"},
        {"type": "voxtral.client_timing", "response_id": "resp_x", "first_word_ms": 1.0},
    ]
    junk: list[Any] = [None, -1, 1e308, "\ud800", "é" * 50, [], {}, True, "A" * 1001]
    out = []
    for _ in range(count):
        event = json.loads(json.dumps(rng.choice(valid)))
        for _ in range(rng.randint(1, 3)):
            key = rng.choice([*event.keys(), "extra"])
            event[key] = rng.choice(junk)
        out.append(json.dumps(event) if rng.random() < 0.9 else "{not json")
    return out


async def session_loop(
    url: str, run: Run, name: str, vad: bool, audio: list[str], fuzz: int
) -> None:
    async with websockets.connect(url, max_size=None) as ws:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        fuzzing = True

        async def read() -> None:
            async for text in ws:
                event = json.loads(text)
                if event["type"] == "error":
                    counter = run.fuzz_errors if fuzzing else run.errors
                    counter[event["error"]["code"]] += 1
                inbox.put_nowait(event)

        reader = asyncio.create_task(read())

        async def until(*types: str) -> dict[str, Any]:
            while True:
                event = await asyncio.wait_for(inbox.get(), TURN_TIMEOUT_S)
                if event["type"] in types:
                    return event

        try:
            await until("session.created")
            for text in mutated_events(fuzz, random.Random(name)):
                await ws.send(text)
            # A barrier (no fuzzed event is a clear): every fuzzed event has been handled,
            # and whatever audio they left behind is gone.
            await ws.send('{"type": "input_audio_buffer.clear"}')
            await until("input_audio_buffer.cleared")
            fuzzing = False
            update: dict[str, Any] = {"audio": {"input": {"turn_detection": None}}}
            session = with_16k_input({} if vad else update)
            await ws.send(json.dumps({"type": "session.update", "session": session}))
            await until("session.updated")
            while run.take():
                for text in audio:
                    await ws.send(text)
                if not vad:
                    await ws.send('{"type": "input_audio_buffer.commit"}')
                    await ws.send('{"type": "response.create"}')
                try:
                    done = await until("response.done")
                except TimeoutError:
                    run.lost += 1
                    continue
                if done["response"]["status"] != "completed":
                    run.lost += 1
                    continue
                run.finished(name)
                timings = done.get("timings", {})
                run.queue_wait_ms.append(timings.get("queue_wait_ms", 0.0))
                run.turn_ms.append(timings.get("total_ms", 0.0) - timings.get("queue_wait_ms", 0))
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


async def soak(base_url: str, run: Run, sessions: int, fuzz: int, prefix: str) -> None:
    speech = read_audio_file(CLIP)  # speech, then 1.3 s of silence: the VAD ends the turn
    audio = appends(speech, chunk_ms=200)
    url = base_url.replace("http", "ws", 1) + "/v1/realtime"
    await asyncio.gather(
        *(session_loop(url, run, f"{prefix}{i}", i % 2 == 0, audio, fuzz) for i in range(sessions))
    )


def plot_rss(rss: list[tuple[int, float]], starts: dict[str, int], path: Path) -> Path:
    """RSS against turns completed, a dashed line where each phase (new server) begins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([t for t, _ in rss], [mb for _, mb in rss], marker=".")
    for name, at in starts.items():
        ax.axvline(at, color="grey", linestyle="--")
        ax.annotate(f"tts {name}", (at, 1), xycoords=("data", "axes fraction"), va="top")
    ax.set_xlabel("turns completed")
    ax.set_ylabel("RSS of server + clients (MB)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--fuzz", type=int, default=0, help="mutated events per session first")
    parser.add_argument("--rss-every", type=int, default=50, help="turns between RSS samples")
    args = parser.parse_args(argv)
    speech_out = shutil.which("espeak-ng") is not None
    run = Run(args.turns, args.rss_every)
    leaks: list[tuple[str, dict[str, float], dict[str, float]]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp) / "tiny", script=SCRIPT)
        phases = [("none", args.turns // 2 if speech_out else args.turns)]
        if speech_out:
            phases.append(("espeak", args.turns - phases[0][1]))
        starts: dict[str, int] = {}  # turns completed when each phase began
        for engine, turns in phases:
            starts[engine] = sum(run.completed.values())
            settings = Settings.model_validate(
                {
                    "model": {"id": str(model), "warmup_runs": 1},
                    "tts": {"engine": engine},
                    # every session comes from this one address
                    "server": {
                        "max_sessions": max(args.sessions, 32),
                        "max_sessions_per_client": None,
                    },
                    "engine": {"queue_size": max(args.sessions, 32)},
                    "logging": {"file": None},
                }
            )
            run.total = run.started + turns
            with InProcessServer(create_app(settings)) as server:
                # This process (server and clients) with the model loaded, before any session
                # and after every one has closed: what grows is what the sessions left.
                before = resources()
                asyncio.run(soak(server.base_url, run, args.sessions, args.fuzz, engine))
                server.run(server.state.idle.wait(), 60)
                after = resources()
                after["rss_trimmed_mb"] = trimmed_rss_mb()
                leaks.append((engine, before, after))
    elapsed = time.perf_counter() - started
    per_session = list(run.completed.values()) or [0]
    spread = max(per_session) / max(min(per_session), 1)
    turn = float(np.median(run.turn_ms)) if run.turn_ms else 0.0
    bound = args.sessions * turn + 1000
    rows = [
        ["turns completed", sum(run.completed.values())],
        ["turns lost", run.lost],
        [
            "errors during turns",
            ", ".join(f"{k}={v}" for k, v in sorted(run.errors.items())) or "none",
        ],
        ["error events answering fuzzed events", sum(run.fuzz_errors.values())],
        ["turns per session (min / max)", f"{min(per_session)} / {max(per_session)}"],
        ["max/min turns per session (target <= 1.3)", round(spread, 2)],
        [
            "queue wait p50 / p99 / max (ms)",
            f"{pct(run.queue_wait_ms, 50):.0f} / {pct(run.queue_wait_ms, 99):.0f} / "
            f"{max(run.queue_wait_ms, default=0):.0f}",
        ],
        ["bound: sessions x median turn + 1 s (ms)", round(bound)],
        *(
            row
            for tts, before, after in leaks
            for row in (
                [
                    f"[tts {tts}] RSS before / after (MB)",
                    f"{before['rss_mb']:.0f} / {after['rss_mb']:.0f}",
                ],
                [
                    f"[tts {tts}] RSS after gc + malloc_trim (MB)",
                    f"{after['rss_trimmed_mb']:.0f}",
                ],
                [f"[tts {tts}] fds before / after", f"{before['fds']} / {after['fds']}"],
                [
                    f"[tts {tts}] threads before / after",
                    f"{before['threads']} / {after['threads']}",
                ],
            )
        ),
        ["wall time (s)", round(elapsed, 1)],
    ]
    print(table(["measure", "value"], rows))
    path = write_json(
        "soak",
        {
            "turns": args.turns,
            "sessions": args.sessions,
            "fuzz_events_per_session": args.fuzz,
            "speech_out": speech_out,
            "completed": sum(run.completed.values()),
            "lost": run.lost,
            "errors": dict(run.errors),
            "fuzz_errors": dict(run.fuzz_errors),
            "turns_per_session": dict(run.completed),
            "spread": spread,
            "queue_wait_ms": {
                "p50": pct(run.queue_wait_ms, 50),
                "p99": pct(run.queue_wait_ms, 99),
                "max": max(run.queue_wait_ms, default=0),
            },
            "bound_ms": bound,
            "resources": [{"tts": t, "before": b, "after": a} for t, b, a in leaks],
            "wall_s": elapsed,
            "rss_every_turns": args.rss_every,
            "rss_mb_by_turns": run.rss,
            "phase_starts_at_turns": starts,
        },
    )
    print(f"\nwrote {path}")
    print(f"wrote {plot_rss(run.rss, starts, path.with_name('soak_rss.png'))}")
    return 0 if run.lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
