"""Load: first word, queue wait, errors and server memory at 1, 4, 16 and 32 concurrent sessions.

    python benchmarks/load.py [--model DIR_OR_HUB_ID] [--config FILE] [--audio FILE]
                              [--levels 1 4 16 32] [--turns N] [--queue-size N] [--pace]
                              [--max-batch 1 16] [--engine transformers|vllm]
                              [--vllm-endpoint URL ...]

--max-batch runs the whole set of levels once per `engine.max_batch` value, each on a fresh
server, in the same run: 1 is the serial worker (one answer at a time), 16 continuous
batching; the table then compares them (the targets of continuous batching are printed as
ratios against the same run's single session).

--engine vllm sends the turns to vLLM server(s) (engine.vllm.endpoints, or --vllm-endpoint)
instead of loading the model here; queue wait is then ~0 and the first word includes vLLM's
own scheduling.

Starts the real app (`create_app` with the default engine factory: the server loads the model
itself) once, under uvicorn on a free loopback port in this process, with `server.max_sessions`
raised to fit the largest level. Then, for each concurrency level C, opens C WebSocket
sessions at once; each does --turns push-to-talk turns in transcription mode (no
conversation history grows the prompt): session.update (`"type": "transcription"`,
turn_detection null); the clip as input_audio_buffer.append events of 40 ms (back to back,
or at real-time pace with --pace); a no-op session.update round trip, so the server holds
all the audio before the commit is timed; input_audio_buffer.commit (a transcription session
writes the turn down by itself); read up to
conversation.item.input_audio_transcription.completed. All sessions run their turns at the
same time; the serial worker answers one at a time, so its queue wait grows with C, while
the batched one runs up to max_batch answers together: that is what this benchmark shows.
With no --model it builds a tiny scripted checkpoint (real architecture, random weights, a
fixed 11-word answer), so it runs offline on a CPU.

Per level:
  client 1st word  commit sent -> first input_audio_transcription.delta received (client clock)
  server 1st word  commit received -> first delta handed to the transport (timings.first_word_ms)
  queue wait       request queued -> engine worker picks it up (timings.queue_wait_ms)
  turns            completed turns / turns attempted
  errors           `error` events by code, failed connections, timeouts, responses that did
                   not complete (an `engine_busy` turn gets an error and no response)
  turns/s          completed turns / wall time of the level (connect -> last turn ends)
  tok/s            generated tokens of completed turns / wall time of the level (aggregate)
  tok/s per turn   one answer's decode rate, (tokens - 1) / (total - queue wait - model
                   TTFT), median over the level's turns
  RSS              the server's resident memory (this process: server and clients share it)
                   before the level and after it, once every session is closed
The clients run in the server's process (their own event loop and thread, sharing the GIL),
so at high C part of the client-side time is the clients' own work. engine.queue_size (at
least server.max_sessions, 32 by default) holds one turn per session, so no level is refused.
Writes benchmarks/out/load.json and load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _clients import CHUNK_MS, appends, with_16k_input
from _common import OUT, machine, pct, table, write_json

from voxtral_server.api.app import create_app
from voxtral_server.api.inprocess import InProcessServer
from voxtral_server.config import Settings, load_settings
from voxtral_server.models.audio import read_audio_file

ANSWER = "Hello world, the quick brown fox jumps over the lazy dog."
ENGINES = ("transformers", "vllm")  # engine.kind: the model in this process, or vLLM servers
RECV_TIMEOUT_S = 120.0  # longest wait for any one server event
CONNECT_TIMEOUT_S = 30.0
LEVEL_TIMEOUT_S = 600.0  # a whole level, after which its sessions are abandoned
IDLE_TIMEOUT_S = 30.0  # for the server to close every session after a level
SESSION = {
    "type": "session.update",
    "session": with_16k_input(
        {"type": "transcription", "audio": {"input": {"turn_detection": None}}}
    ),
}
BARRIER = json.dumps({"type": "session.update", "session": {}})  # a no-op round trip
METRICS = {  # per-turn key -> label
    "client_ms": "client 1st word",
    "first_word_ms": "server 1st word",
    "queue_wait_ms": "queue wait",
}


# ----------------------------------------------------------------- server


def rss_mb() -> float:
    """Resident memory of this process (server + clients), from /proc; NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


@dataclass
class RunningServer:
    engine: str
    server: InProcessServer

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def state(self) -> Any:  # the app's ServerState
        return self.server.state

    def open_sessions(self) -> int:
        return len(self.state.sessions)

    def stop(self) -> None:
        self.server.stop()


def start_server(settings: Settings, engine: str = "transformers") -> RunningServer:
    """The real app for `settings` on a free loopback port, model loaded and warmed up.

    `engine` picks how the model is served (`engine.kind`): transformers loads it in this
    process, vllm streams from the servers in `engine.vllm.endpoints`.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    settings = settings.with_overrides({("engine", "kind"): engine})
    return RunningServer(engine, InProcessServer(create_app(settings)).start())


# ----------------------------------------------------------------- clients


class TurnFailed(Exception):
    """The turn ended without a completed response; `code` says why."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class SessionResult:
    turns: list[dict[str, Any]] = field(default_factory=list)
    attempted: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class Client:
    """One WebSocket session; every `error` event it reads is counted by code."""

    def __init__(self, result: SessionResult) -> None:
        self.result = result

    async def connect(self, base_url: str) -> None:
        import websockets

        url = base_url.replace("http", "ws", 1) + "/v1/realtime"
        self.ws = await websockets.connect(
            url, max_size=16 * 1024 * 1024, open_timeout=CONNECT_TIMEOUT_S, close_timeout=5
        )

    async def recv_until(self, *types: str, stop_on_error: bool = False) -> tuple[float, dict]:
        while True:
            text = await asyncio.wait_for(self.ws.recv(), RECV_TIMEOUT_S)
            at = time.perf_counter()
            event = json.loads(text)
            if event["type"] == "error":
                code = event["error"].get("code", "unknown")
                self.result.errors[code] += 1
                if stop_on_error:
                    raise TurnFailed(code)
            elif event["type"] in types:
                return at, event

    async def close(self) -> None:
        await self.ws.close()


DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
FAILED = "conversation.item.input_audio_transcription.failed"


async def run_turn(client: Client, audio_events: list[str], pace: bool) -> dict[str, Any]:
    for text in audio_events:
        await client.ws.send(text)
        if pace:
            await asyncio.sleep(CHUNK_MS / 1000)
    await client.ws.send(BARRIER)  # every append is in the buffer once this is answered
    await client.recv_until("session.updated")
    sent = time.perf_counter()
    # A transcription session writes the committed turn down by itself.
    await client.ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    # engine_busy (queue full) is a transcription.failed event: the turn ends there.
    at, event = await client.recv_until(DELTA, COMPLETED, FAILED, stop_on_error=True)
    first_at = at if event["type"] == DELTA else None
    if event["type"] == DELTA:
        _, event = await client.recv_until(COMPLETED, FAILED)
    if event["type"] == FAILED:
        code = event["error"].get("code", "unknown")
        client.result.errors[code] += 1
        raise TurnFailed(code)
    t = event["timings"]
    return {
        "client_ms": (first_at - sent) * 1000 if first_at is not None else None,
        "first_word_ms": t.get("first_word_ms"),
        "queue_wait_ms": t.get("queue_wait_ms"),
        "model_ttft_ms": t.get("model_ttft_ms"),
        "total_ms": t.get("total_ms"),
        "words": t.get("words"),
        "tokens": t.get("tokens"),
    }


async def open_session(base_url: str, result: SessionResult) -> Client | None:
    client = Client(result)
    try:
        await client.connect(base_url)
    except Exception as exc:  # refused handshake, timeout, reset
        result.errors[f"connect:{type(exc).__name__}"] += 1
        return None
    try:
        # A refused session (too_many_sessions, not_ready) sends one error event, then closes.
        await client.recv_until("session.created", stop_on_error=True)
        await client.ws.send(json.dumps(SESSION))
        await client.recv_until("session.updated", stop_on_error=True)
    except TurnFailed:
        await client.close()
        return None
    except Exception as exc:
        result.errors[f"connect:{type(exc).__name__}"] += 1
        await client.close()
        return None
    return client


async def run_session(client: Client, audio_events: list[str], turns: int, pace: bool) -> None:
    result = client.result
    try:
        for _ in range(turns):
            result.attempted += 1
            with contextlib.suppress(TurnFailed):  # counted where it was seen
                result.turns.append(await run_turn(client, audio_events, pace))
    except TimeoutError:
        result.errors["timeout"] += 1
    except Exception as exc:  # the connection dropped
        result.errors[f"session:{type(exc).__name__}"] += 1
    finally:
        await client.close()


async def run_level(
    server: RunningServer, audio_events: list[str], sessions: int, turns: int, pace: bool
) -> dict[str, Any]:
    results = [SessionResult() for _ in range(sessions)]
    t0 = time.perf_counter()
    clients = await asyncio.gather(*(open_session(server.base_url, r) for r in results))
    connected = [c for c in clients if c is not None]
    tasks = [asyncio.create_task(run_session(c, audio_events, turns, pace)) for c in connected]
    done, pending = await asyncio.wait(tasks, timeout=LEVEL_TIMEOUT_S) if tasks else ((), ())
    wall_s = time.perf_counter() - t0
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update({k: v for k, v in r.errors.items() if v})
    if pending:
        errors["level_timeout"] += len(pending)
    return {
        "sessions": sessions,
        "connected": len(connected),
        "attempted": sum(r.attempted for r in results) + (sessions - len(connected)) * turns,
        "wall_s": wall_s,
        "errors": dict(errors),
        "turns": [t for r in results for t in r.turns],
    }


async def wait_idle(server: RunningServer) -> bool:
    """Until the server has closed every session (its `idle` event, on its own loop)."""
    idle = asyncio.wait_for(server.state.idle.wait(), IDLE_TIMEOUT_S)
    future = asyncio.run_coroutine_threadsafe(idle, server.server.loop)
    with contextlib.suppress(TimeoutError):
        await asyncio.wrap_future(future)
    return server.open_sessions() == 0


async def run_all(
    server: RunningServer, audio_events: list[str], levels: list[int], turns: int, pace: bool
) -> list[dict[str, Any]]:
    out = []
    for sessions in levels:
        await wait_idle(server)
        before = rss_mb()
        level = await run_level(server, audio_events, sessions, turns, pace)
        if not await wait_idle(server):
            level["errors"]["sessions_left_open"] = server.open_sessions()
        level["rss_before_mb"], level["rss_after_mb"] = before, rss_mb()
        done = len(level["turns"])
        print(
            f"{sessions:>3} sessions: {done}/{level['attempted']} turns in "
            f"{level['wall_s']:.1f} s, errors {level['errors'] or 'none'}",
            flush=True,
        )
        out.append(level)
    return out


# ----------------------------------------------------------------- report


def decode_rate(turn: dict[str, Any]) -> float | None:
    """One answer's tokens/s after its first token (None if it cannot be told)."""
    tokens, total = turn.get("tokens"), turn.get("total_ms")
    waited, ttft = turn.get("queue_wait_ms"), turn.get("model_ttft_ms")
    if not tokens or tokens < 2 or None in (total, waited, ttft):
        return None
    decode_ms = total - waited - ttft
    return (tokens - 1) / (decode_ms / 1000) if decode_ms > 0 else None


def summarise(level: dict[str, Any], max_batch: int | None) -> dict[str, Any]:
    turns = level["turns"]
    summary: dict[str, Any] = {}
    for key in METRICS:
        values = [t[key] for t in turns if t[key] is not None]
        summary[key] = {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95)}
    completed = len(turns)
    wall = level["wall_s"]
    rates = [r for r in (decode_rate(t) for t in turns) if r is not None]
    return {
        "max_batch": max_batch,
        "sessions": level["sessions"],
        "connected": level["connected"],
        "turns_completed": completed,
        "turns_attempted": level["attempted"],
        "errors": level["errors"],
        "wall_s": wall,
        "turns_per_s": completed / wall if wall > 0 else float("nan"),
        "tokens_per_s": sum(t["tokens"] or 0 for t in turns) / wall if wall > 0 else float("nan"),
        "turn_tokens_per_s_p50": pct(rates, 50),
        "rss_before_mb": level["rss_before_mb"],
        "rss_after_mb": level["rss_after_mb"],
        **summary,
    }


def label(max_batch: int | None) -> str:
    if max_batch is None:
        return "vllm"
    return "serial" if max_batch == 1 else f"batched {max_batch}"


def plot(runs: dict[str, list[dict[str, Any]]], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, results) in enumerate(runs.items()):
        x = [r["sessions"] for r in results]
        color = f"C{i}"
        for q, style in (("p50", "-"), ("p95", "--")):
            values = [r["client_ms"][q] for r in results]
            ax.plot(x, values, style, color=color, marker="o", label=f"{name}: 1st word {q}")
        for r in results:
            n_err = sum(r["errors"].values())
            if n_err:
                ax.annotate(
                    f"{n_err} errors",
                    (r["sessions"], r["client_ms"]["p95"]),
                    xytext=(-40, 8),
                    textcoords="offset points",
                    fontsize=8,
                    color=color,
                )
    sessions = sorted({r["sessions"] for results in runs.values() for r in results})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sessions, [str(v) for v in sessions])
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("client first word, ms")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "load.png", dpi=110)
    print(f"wrote {OUT / 'load.png'}")


def targets(runs: dict[str, list[dict[str, Any]]], sessions: int) -> list[list[Any]]:
    """Continuous batching's targets, as ratios within this run (batched vs serial)."""
    serial = {r["sessions"]: r for r in runs.get("serial", [])}
    rows: list[list[Any]] = []
    for name, results in runs.items():
        if name == "serial":
            continue
        by = {r["sessions"]: r for r in results}
        one, many, base = by.get(1), by.get(sessions), serial.get(1)
        if one is None or many is None:
            continue
        p50_1 = one["client_ms"]["p50"]
        rows.append([
            name, f"{sessions} sessions: 1st word p95 / 1-session p50",
            many["client_ms"]["p95"] / p50_1, "<= 3",
        ])  # fmt: skip
        rows.append([
            name, f"{sessions} sessions: aggregate tok/s / 1-session",
            many["tokens_per_s"] / one["tokens_per_s"], ">= 4",
        ])  # fmt: skip
        if base is not None:
            rows.append([
                name, "1 session: 1st word p50 / serial's",
                p50_1 / base["client_ms"]["p50"], "<= 1.10",
            ])  # fmt: skip
            rows.append([
                name, "1 session: tok/s per turn / serial's",
                one["turn_tokens_per_s_p50"] / base["turn_tokens_per_s_p50"], ">= 0.90",
            ])  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="hub id or folder (default: a tiny scripted checkpoint)")
    parser.add_argument("--config", type=Path, help="config file (default: ./config.yaml)")
    parser.add_argument(
        "--audio", type=Path, default=Path(__file__).parent.parent / "static" / "sample.wav"
    )
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--turns", type=int, default=3, help="push-to-talk turns per session")
    parser.add_argument("--queue-size", type=int, help="engine.queue_size (default: config)")
    parser.add_argument(
        "--max-batch",
        type=int,
        nargs="+",
        default=[1, 16],
        help="engine.max_batch values to compare in this run (1 = the serial worker)",
    )
    parser.add_argument("--pace", action="store_true", help="send the audio in real time")
    parser.add_argument(
        "--answer-words",
        type=int,
        help="the tiny checkpoint's answer: this many words (default: an 11-word sentence; "
        "a long answer shows decoding, a short one prefill)",
    )
    parser.add_argument("--engine", choices=ENGINES, default="transformers")
    parser.add_argument(
        "--vllm-endpoint",
        action="append",
        help="vLLM base URL, repeatable (default: engine.vllm.endpoints); with --engine vllm",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show server warnings")
    args = parser.parse_args()
    if min(args.levels) < 1 or args.turns < 1 or min(args.max_batch) < 1:
        parser.error("--levels, --turns and --max-batch must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # every slow turn and every engine_busy is logged: expected here
        logging.getLogger("voxtral_server").setLevel(logging.ERROR)

    if args.model is None and args.engine == "transformers":  # vLLM serves its own model
        from voxtral_server.models.tiny import build_tiny

        words = [f"word{i}" for i in range(args.answer_words or 0)]
        script = " ".join(words) + "." if words else ANSWER
        args.model = str(build_tiny(Path(tempfile.mkdtemp()) / "tiny", script=script))
    settings = load_settings(args.config, {("model", "id"): args.model})
    # the previous level's sessions may still be closing: room for both
    sessions = max(settings.server.max_sessions, 2 * max(args.levels))
    overrides: dict[tuple[str, str], Any] = {
        ("server", "max_sessions"): sessions,
        ("server", "max_sessions_per_client"): sessions,  # every session comes from here
        # one waiting turn per session (the server refuses a smaller queue)
        ("engine", "queue_size"): args.queue_size or max(settings.engine.queue_size, sessions),
    }
    if args.vllm_endpoint:
        vllm = settings.engine.vllm.model_dump() | {"endpoints": args.vllm_endpoint}
        overrides[("engine", "vllm")] = vllm
    settings = settings.with_overrides(overrides)
    model = args.model or "served by " + ", ".join(settings.engine.vllm.endpoints)
    audio = read_audio_file(args.audio)
    audio_events = appends(audio)

    t_start = time.perf_counter()
    batches: list[int | None] = list(args.max_batch) if args.engine == "transformers" else [None]
    servers: dict[str, RunningServer] = {}
    rss_loaded: dict[str, float] = {}
    try:
        for max_batch in batches:
            run_settings = settings
            if max_batch is not None:
                run_settings = settings.with_overrides({("engine", "max_batch"): max_batch})
            t0 = time.perf_counter()
            name = label(max_batch)
            servers[name] = start_server(run_settings, args.engine)
            print(f"[{name}] up at {servers[name].base_url} in {time.perf_counter() - t0:.1f} s")
            rss_loaded[name] = rss_mb()
        # Level by level, each worker in turn (the others idle): a machine that gets busier
        # during the run shifts every worker's figures alike.
        raws: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for level in args.levels:
            for name, server in servers.items():
                print(f"[{name}]", end="")
                raws[name] += asyncio.run(
                    run_all(server, audio_events, [level], args.turns, args.pace)
                )
    finally:
        for server in servers.values():
            server.stop()
    runs = {
        name: [summarise(level, mb) for level in raws[name]]
        for name, mb in zip(servers, batches, strict=True)
    }
    run_s = time.perf_counter() - t_start

    rows = []
    for name, results in runs.items():
        for r in results:
            errors = ", ".join(f"{k}={v}" for k, v in sorted(r["errors"].items())) or "0"
            rows.append([
                name, r["sessions"], f"{r['turns_completed']}/{r['turns_attempted']}",
                r["client_ms"]["p50"], r["client_ms"]["p95"],
                r["first_word_ms"]["p50"], r["first_word_ms"]["p95"],
                r["queue_wait_ms"]["p50"], r["queue_wait_ms"]["p95"],
                r["turns_per_s"], r["tokens_per_s"], r["turn_tokens_per_s_p50"], errors,
                r["rss_before_mb"], r["rss_after_mb"],
            ])  # fmt: skip
    seconds = len(audio) / 16000
    print(f"machine: {machine()}")
    print(
        f"model: {model}  engine: {args.engine}  audio: {args.audio.name} "
        f"({seconds:.1f} s{', real-time pace' if args.pace else ''})  "
        f"queue_size: {settings.engine.queue_size}"
    )
    print(f"{args.turns} transcription turns per session; times in ms, RSS in MiB")
    print(table(
        ["worker", "sessions", "turns", "client p50", "client p95", "server p50", "server p95",
         "queue p50", "queue p95", "turns/s", "tok/s", "tok/s per turn", "errors",
         "RSS before", "RSS after"],
        rows,
    ))  # fmt: skip
    goals = targets(runs, 16 if 16 in args.levels else max(args.levels))
    if goals:
        print("targets (ratios within this run):")
        print(table(["worker", "measure", "ratio", "target"], goals))
    print(f"RSS after load: {rss_loaded}; total run {run_s:.1f} s")
    path = write_json(
        "load",
        {
            "model": model,
            "engine": args.engine,
            "audio": args.audio.name,
            "audio_s": seconds,
            "paced": args.pace,
            "turns_per_session": args.turns,
            "queue_size": settings.engine.queue_size,
            "max_sessions": settings.server.max_sessions,
            "definitions": METRICS,
            "rss_after_load_mb": rss_loaded,
            "run_s": run_s,
            "results": runs,
            "targets": goals,
            "raw": {name: [level["turns"] for level in raw] for name, raw in raws.items()},
        },
    )
    print(f"wrote {path}")
    plot(runs, f"{args.turns} push-to-talk turns per session, {args.engine} engine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
