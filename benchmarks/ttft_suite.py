"""TTFT suite: go/no-go lines for time to first word, cancel latency and queue wait.

    python benchmarks/ttft_suite.py [--model DIR_OR_HUB_ID] [--config FILE] [--audio FILE]
                                    [--turns N] [--cancels N] [--short] [--baseline seed]

Starts the real app (`create_app`, the server loads the model itself) under uvicorn on a free
loopback port in this process, runs hands-free (server VAD) turns over the WebSocket and over
WebRTC (an aiortc client), then prints:
  - the three go/no-go lines in the original system's format (TTFT p95 against
    `performance_targets.ttft_ms`, cancel latency against 300 ms, queue wait p95);
  - a table of p50/p95/p99 of every timing of `response.done` plus the client's own figures,
    per transport;
  - with `--baseline seed`: the whole suite again, in the same process, on a second server
    with the original system's behaviour (6-word chunks, processor features, no warm-up), and
    a side-by-side table with the ratio seed / ours;
  - with espeak-ng installed, a speech pass (`benchmarks/_speech.py`): TTFA p50/p95 per
    transport with `tts.engine: espeak`, and on a long run-on answer the first audio with
    phrase chunking against waiting for the sentence end (ratio, same run);
and writes benchmarks/out/ttft_suite.json and ttft_suite.png (CDF of the client TTFT per
transport, and per variant with --baseline). With no --model it builds a tiny scripted
checkpoint (real architecture, random weights, a fixed 64-word answer, so that a cancel has
something to stop); it runs offline on a CPU. `--short` (3 turns and 2 cancels per
transport) is what the test command runs. `main(argv)` returns the exit code: 0 when the
suite ran (whatever the verdicts), 1 when it could not run (model failed to load, ...).

How a turn runs. Every turn opens a fresh conversation (a new WebSocket, or a new peer
connection), so no turn carries the previous turns' audio in its chat prompt (with history
the prompt, and so the TTFT, grows turn after turn) and the VAD starts from the same state
each time; connecting is not timed. The clip (static/sample.wav by default: 0.3 s silence,
speech, 1.3 s silence) is sent as `input_audio_buffer.append` events of 40 ms PCM16 in
base64. Before the measured turns one calibration conversation (turn_detection with
create_response false, so no generation happens and the seed's cold first request stays in
its counted turns) sends the chunks one at a time to find the chunk k whose VAD pass ends the
turn (speech followed by vad.min_silence_ms of silence). A measured turn then sends chunks
0..k-1 as fast as the client can write them, waits for a no-op `session.update` round trip (so
the server has run the VAD over all of them), starts the client clock, sends chunk k, and
reads the server's speech_stopped, committed, response.created, deltas and response.done. The
tail of the clip after chunk k is silence that changes nothing and is not sent. On WebRTC the
same events go on the `oai-events` data channel and no audio track is opened: the session
handles an append there exactly as on the WebSocket, so both transports carry identical
audio, and an Opus track would add codec loss and real-time pacing (4 s a turn) that make the
two transports' figures incomparable. The client runs in the server's process (shares the
GIL); with --mode the conversation is switched to chat or transcribe before the audio.

Definitions (ms):
  client TTFT        chunk k sent (the append that ends the turn) -> first
                     response.output_text.delta received, client perf_counter. The TTFT
                     go/no-go line is its p95 over the TTFT turns of both transports.
  server first word  timings.first_word_ms: end of speech detected by the server's VAD (while
                     handling chunk k) -> first delta handed to the transport.
  model TTFT, queue wait, 1st token -> delta, delivery, server total: timings.model_ttft_ms,
                     queue_wait_ms, first_token_to_delta_ms, delivery_ms, total_ms (README,
                     "Wire protocol").
  client total       chunk k sent -> response.done received.
  client cancel      on separate turns, response.cancel sent the moment the first delta
                     arrives -> response.done (status cancelled) received. The cancel line is
                     its p95 over both transports (target < 300 ms); a cancel turn whose
                     response completed anyway counts as a FAIL.
  server cancel      timings.cancel_latency_ms: the engine's cancel() -> generation stopped.
  queue wait line    p95 of timings.queue_wait_ms over the TTFT turns of both transports;
                     ≤ 10 ms counts as ≈0 (OK, PASS), above as INVESTIGATE (FAIL).
  first word - model TTFT
                     first_word_ms - model_ttft_ms per turn: queue wait + the decode steps
                     until the first word is complete (a word is complete once the next token
                     starts with whitespace; model time) + delivery. A fourth line after the
                     go/no-go lines reports its p95 and checks the server's own share (queue
                     wait + delivery) against ≤ 3 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when imported
from _clients import CHUNK_MS, WebRTCClient, WebSocketClient, appends, with_16k_input
from _common import OUT, machine, median, pct, table, write_json
from _speech import measure_speech, speech_engine

from voxtral_server.api.app import create_app
from voxtral_server.api.inprocess import InProcessServer
from voxtral_server.config import Settings, load_settings
from voxtral_server.models.audio import read_audio_file

ANSWER = (
    "Paris is mild today, with a light breeze from the west and a few clouds in the "
    "afternoon. Expect around eighteen degrees, a little rain after sunset, and a clear, "
    "cool morning tomorrow, so a light jacket should be enough if you go out early. The "
    "weekend looks brighter, with sunshine on Saturday and warmer air moving in from the "
    "south by Sunday afternoon."
)  # 64 words
CANCEL_TARGET_MS = 300.0
QUEUE_OK_MS = 10.0
SERVER_OWN_MS = 3.0  # expected p95 of the server's own share of first word - model TTFT
EVENT_TIMEOUT_S = 120.0
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "ours": {},
    "seed": {  # the original system's behaviour, as in benchmarks/engine.py
        "chunked_response": {"min_words_per_chunk": 6, "max_words_per_chunk": 6},
        "model": {"mel": "processor", "warmup_runs": 0},
    },
}
TTFT_METRICS = {  # row label -> per-turn key, TTFT turns
    "client TTFT: append that ends the turn -> 1st delta": "client_ttft_ms",
    "server first word (timings.first_word_ms)": "first_word_ms",
    "model TTFT (timings.model_ttft_ms)": "model_ttft_ms",
    "queue wait (timings.queue_wait_ms)": "queue_wait_ms",
    "1st token -> delta (first_token_to_delta_ms)": "first_token_to_delta_ms",
    "delivery (timings.delivery_ms)": "delivery_ms",
    "first word - model TTFT": "word_minus_ttft_ms",
    "  of which the server's own: queue wait + delivery": "server_own_ms",
    "server total (timings.total_ms)": "total_ms",
    "client total: append -> response.done": "client_total_ms",
}
CANCEL_METRICS = {  # cancel turns
    "client cancel: cancel sent -> response.done": "client_cancel_ms",
    "server cancel (timings.cancel_latency_ms)": "cancel_latency_ms",
}
BARRIER = json.dumps({"type": "session.update", "session": {}})  # changes nothing; round trip
CALIBRATE = json.dumps(
    {
        "type": "session.update",
        "session": with_16k_input(
            {"audio": {"input": {"turn_detection": {"create_response": False}}}}
        ),
    }
)


def settings_for(base: Settings, variant: str) -> Settings:
    data = base.model_dump()
    for section, values in VARIANTS[variant].items():
        data[section].update(values)
    return Settings.model_validate(data)


# ----------------------------------------------------------------- server


def start_server(settings: Settings) -> InProcessServer:
    """The real app on a free loopback port, model loaded and warmed up."""
    return InProcessServer(create_app(settings)).start()


# ----------------------------------------------------------------- clients


Client = WebSocketClient | WebRTCClient
CLIENTS: tuple[type[WebSocketClient] | type[WebRTCClient], ...] = (WebSocketClient, WebRTCClient)


async def recv_until(
    client: Client, type_: str, forbid: str | None = None
) -> tuple[float, dict[str, Any]]:
    while True:
        at, event = await asyncio.wait_for(client.recv(), EVENT_TIMEOUT_S)
        if event["type"] == "error":
            raise RuntimeError(f"{client.name}: server error {event['error']}")
        if forbid is not None and event["type"] == forbid:
            raise RuntimeError(
                f"{client.name}: {forbid} arrived before the calibrated chunk was sent "
                "(the VAD ended the turn earlier than in the calibration run)"
            )
        if event["type"] == type_:
            return at, event


async def calibrate(
    base_url: str, audio_events: list[str], min_silence_ms: int
) -> tuple[int, dict[str, Any]]:
    """Index of the append whose audio completes the VAD's silence (fresh conversation, no
    answer). The VAD judges audio off the event loop, so its verdict may come after later
    appends: the index is derived from where it says speech ended, in 32 ms frames."""
    client = WebSocketClient()
    await client.connect(base_url)
    try:
        await recv_until(client, "session.created")
        await client.send(CALIBRATE)
        await recv_until(client, "session.updated")
        for text in audio_events:
            await client.send(text)
        stopped = None
        with contextlib.suppress(TimeoutError):
            _, stopped = await recv_until(client, "input_audio_buffer.speech_stopped")
    finally:
        await client.close()
    if stopped is not None:
        frame = 512  # the VAD's frame (samples)
        end = stopped["audio_end_ms"] * 16
        # The stop is decided on the frame that completes min_silence_ms after the speech
        # end (and at the earliest on the second silent frame).
        needed = max(end + min_silence_ms * 16, end + 2 * frame)
        needed = -(-needed // frame) * frame  # that frame's end
        chunk = 16 * CHUNK_MS
        return -(-needed // chunk) - 1, stopped
    raise RuntimeError(
        "the server's VAD never ended the turn on this clip: it needs speech followed by at "
        "least vad.min_silence_ms of silence"
    )


async def run_turn(
    client_cls: type[WebSocketClient] | type[WebRTCClient],
    base_url: str,
    audio_events: list[str],
    k: int,
    mode: str | None,
    cancel: bool,
) -> dict[str, Any]:
    client = client_cls()
    await client.connect(base_url)
    try:
        await recv_until(client, "session.created")
        session: dict[str, Any] = {}
        if mode is not None:
            session["type"] = "realtime" if mode == "chat" else "transcription"
        update = {"type": "session.update", "session": with_16k_input(session)}
        await client.send(json.dumps(update))
        await recv_until(client, "session.updated")
        for text in audio_events[:k]:
            await client.send(text)
        await client.send(BARRIER)
        await recv_until(client, "session.updated", forbid="input_audio_buffer.speech_stopped")
        sent = time.perf_counter()
        await client.send(audio_events[k])
        first_at, first = await recv_until(client, "response.output_text.delta")
        cancel_sent = None
        if cancel:
            cancel_sent = time.perf_counter()
            await client.send(json.dumps({"type": "response.cancel"}))
        done_at, done = await recv_until(client, "response.done")
    finally:
        await client.close()
    t = done["timings"]
    if t.get("transport") != client.name:
        raise RuntimeError(f"{client.name}: timings say transport {t.get('transport')!r}")
    status = done["response"]["status"]
    if status == "failed" or (not cancel and status != "completed"):
        raise RuntimeError(f"{client.name}: response {done['response']}")
    row: dict[str, Any] = {key: t.get(key) for key in TTFT_METRICS.values()}
    if t.get("model_ttft_ms") is not None:
        row["word_minus_ttft_ms"] = t["first_word_ms"] - t["model_ttft_ms"]
        row["server_own_ms"] = t["queue_wait_ms"] + t["delivery_ms"]
    row.update(
        client_ttft_ms=(first_at - sent) * 1000,
        client_total_ms=(done_at - sent) * 1000,
        status=status,
        words=t.get("words"),
        tokens=t.get("tokens"),
        first_delta=first["delta"],
    )
    if cancel_sent is not None:
        cancelled = status == "cancelled"
        row["client_cancel_ms"] = (done_at - cancel_sent) * 1000 if cancelled else None
        row["cancel_latency_ms"] = t.get("cancel_latency_ms") if cancelled else None
    return row


async def run_variant(
    base_url: str, audio_events: list[str], k: int, turns: int, cancels: int, mode: str | None
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for client_cls in CLIENTS:
        t0 = time.perf_counter()
        ttft = [
            await run_turn(client_cls, base_url, audio_events, k, mode, False) for _ in range(turns)
        ]
        cancelled = [
            await run_turn(client_cls, base_url, audio_events, k, mode, True)
            for _ in range(cancels)
        ]
        out[client_cls.name] = {"ttft": ttft, "cancel": cancelled}
        print(
            f"  {client_cls.name}: {turns} turns + {cancels} cancels in "
            f"{time.perf_counter() - t0:.1f} s"
        )
    return out


# ----------------------------------------------------------------- report


def stats(values: Sequence[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "p50": median(values),
        "p95": pct(values, 95),
        "p99": pct(values, 99),
        "max": max(values, default=float("nan")),
    }


def column(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


def summarise(raw: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per transport and pooled ("all"): stats of every metric."""
    groups = dict(raw)
    groups["all"] = {
        kind: [r for t in raw.values() for r in t[kind]] for kind in ("ttft", "cancel")
    }
    out: dict[str, Any] = {}
    for name, turns in groups.items():
        summary = {key: stats(column(turns["ttft"], key)) for key in TTFT_METRICS.values()}
        for key in CANCEL_METRICS.values():
            summary[key] = stats(column(turns["cancel"], key))
        summary["cancel_turns"] = len(turns["cancel"])
        summary["not_cancelled"] = sum(r["status"] != "cancelled" for r in turns["cancel"])
        out[name] = summary
    return out


def fmt_ms(value: float) -> str:
    return "n/a" if value != value else f"{value:.0f}"


def go_no_go(summary: dict[str, Any], ttft_target: float) -> tuple[list[str], dict[str, str]]:
    pooled = summary["all"]
    ttft = pooled["client_ttft_ms"]["p95"]
    cancel = pooled["client_cancel_ms"]["p95"]
    queue = pooled["queue_wait_ms"]["p95"]
    verdicts = {
        "ttft": "PASS" if ttft <= ttft_target else "FAIL",  # NaN fails
        "cancel": (
            "PASS" if cancel < CANCEL_TARGET_MS and pooled["not_cancelled"] == 0 else "FAIL"
        ),
        "queue_wait": "PASS" if queue <= QUEUE_OK_MS else "FAIL",
    }
    queue_word = "OK (≈0)" if verdicts["queue_wait"] == "PASS" else "INVESTIGATE"
    lines = [
        f"• TTFT (streaming) p95: {fmt_ms(ttft)} ms (target ≤ {ttft_target:,.0f} ms) — "
        f"{verdicts['ttft']}",
        f"• Cancel latency: {fmt_ms(cancel)} ms (target < {CANCEL_TARGET_MS:,.0f} ms) — "
        f"{verdicts['cancel']}",
        f"• Queue wait p95 (TTFT run): {fmt_ms(queue)} ms — {queue_word} — "
        f"{verdicts['queue_wait']}",
    ]
    own = pooled["server_own_ms"]["p95"]
    verdicts["server_own"] = "PASS" if own <= SERVER_OWN_MS else "FAIL"
    lines.append(
        f"• First word - model TTFT p95: {pooled['word_minus_ttft_ms']['p95']:.1f} ms (the "
        "rest of the first word's decode steps, model time, plus the server's own); server's "
        f"own (queue wait + delivery) p95: {own:.2f} ms (target ≤ {SERVER_OWN_MS:.0f} ms) — "
        f"{verdicts['server_own']}"
    )
    return lines, verdicts


def summarise_speech(speech: dict[str, Any]) -> tuple[dict[str, Any], str]:
    summary: dict[str, Any] = {}
    rows = []
    for name, turns in speech["ttfa"].items():
        for key, label in (("ttfa_ms", "server TTFA"), ("client_ttfa_ms", "client TTFA")):
            s = stats(column(turns, key))
            summary[f"{name}_{key}"] = s
            rows.append([label, name, s["n"], s["p50"], s["p95"], s["p99"], s["max"]])
    pooled = [r for turns in speech["ttfa"].values() for r in turns]
    summary["ttfa_ms"] = stats(column(pooled, "ttfa_ms"))
    if "run_on_phrases" in speech:
        for name in ("phrases", "sentence_end"):
            s = stats(column(speech[f"run_on_{name}"], "ttfa_ms"))
            summary[f"run_on_{name}"] = s
            label = f"run-on answer, {name.replace('_', ' ')}: server TTFA"
            rows.append([label, "websocket", s["n"], s["p50"], s["p95"], s["p99"], s["max"]])
        summary["run_on_ratio_p50"] = (
            summary["run_on_sentence_end"]["p50"] / summary["run_on_phrases"]["p50"]
        )
    headers = ["measure (ms)", "transport", "n", "p50", "p95", "p99", "max"]
    return summary, table(headers, rows)


def speech_line(summary: dict[str, Any], engine: str) -> str:
    ttfa = summary["ttfa_ms"]
    line = f"• Speech ({engine}): TTFA p50 {ttfa['p50']:.0f} ms, p95 {ttfa['p95']:.0f} ms"
    if "run_on_ratio_p50" in summary:
        line += (
            f"; run-on answer, first audio p50 {summary['run_on_phrases']['p50']:.0f} ms with "
            f"phrase chunking vs {summary['run_on_sentence_end']['p50']:.0f} ms at the "
            f"sentence end ({summary['run_on_ratio_p50']:.1f}x sooner)"
        )
    return line


def timing_table(summary: dict[str, Any]) -> str:
    rows = []
    for label, key in {**TTFT_METRICS, **CANCEL_METRICS}.items():
        for name in (c.name for c in CLIENTS):
            s = summary[name][key]
            rows.append([label, name, s["n"], s["p50"], s["p95"], s["p99"], s["max"]])
    return table(["measure (ms)", "transport", "n", "p50", "p95", "p99", "max"], rows)


def ratio_table(results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    rows, ratios = [], {}
    metrics = {"client TTFT": "client_ttft_ms", "server first word": "first_word_ms"}
    for label, key in metrics.items():
        for name in (*(c.name for c in CLIENTS), "all"):
            seed, ours = (
                results["seed"]["summary"][name][key],
                results["ours"]["summary"][name][key],
            )
            r50, r95 = seed["p50"] / ours["p50"], seed["p95"] / ours["p95"]
            ratios[f"{key}.{name}"] = {"p50": r50, "p95": r95}
            rows.append([label, name, seed["p50"], ours["p50"], f"{r50:.2f}x"])
            rows[-1] += [seed["p95"], ours["p95"], f"{r95:.2f}x"]
    headers = ["measure (ms)", "transport", "seed p50", "ours p50", "seed/ours"]
    headers += ["seed p95", "ours p95", "seed/ours"]
    return table(headers, rows), ratios


def plot(results: dict[str, Any], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for variant, result in results.items():
        for name, turns in result["raw"].items():
            values = np.sort(column(turns["ttft"], "client_ttft_ms"))
            if values.size == 0:
                continue
            y = np.arange(1, values.size + 1) / values.size
            style = "-" if variant == "ours" else "--"
            label = name if len(results) == 1 else f"{variant} {name}"
            ax.step(values, y, where="post", linestyle=style, label=label)
    ax.axvline(target, color="grey", linestyle=":", label=f"target {target:g} ms")
    ax.set_xlabel("append that ends the turn -> first delta received (ms, client clock)")
    ax.set_ylabel("fraction of turns")
    ax.set_title("client TTFT, server VAD turns")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------- main


def measure_variant(
    settings: Settings, audio_events: list[str], turns: int, cancels: int, mode: str | None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    server = start_server(settings)
    base_url = server.base_url
    load_s = time.perf_counter() - t0
    print(f"  server up at {base_url} in {load_s:.1f} s (load + warm-up)")
    try:
        t1 = time.perf_counter()
        silence_ms = settings.vad.min_silence_ms
        k, stopped = asyncio.run(calibrate(base_url, audio_events, silence_ms))
        print(
            f"  VAD calibration: append #{k} of {len(audio_events)} ends the turn "
            f"(speech ends at {stopped['audio_end_ms']} ms, detected at "
            f"{(k + 1) * CHUNK_MS} ms of audio) in {time.perf_counter() - t1:.1f} s"
        )
        raw = asyncio.run(run_variant(base_url, audio_events, k, turns, cancels, mode))
    finally:
        server.stop()
    return {
        "load_and_warmup_s": load_s,
        "vad_end_append": k,
        "speech_end_ms": stopped["audio_end_ms"],
        "summary": summarise(raw),
        "raw": raw,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--model", help="hub id or folder (default: a tiny scripted checkpoint)")
    parser.add_argument("--config", type=Path, help="config file (default: ./config.yaml)")
    parser.add_argument(
        "--audio", type=Path, default=Path(__file__).parent.parent / "static" / "sample.wav"
    )
    parser.add_argument("--turns", type=int, help="TTFT turns per transport (default 20)")
    parser.add_argument("--cancels", type=int, help="cancel turns per transport (default 5)")
    parser.add_argument("--short", action="store_true", help="3 turns and 2 cancels per transport")
    parser.add_argument(
        "--mode", choices=["chat", "transcribe"], help="default: the config's `mode`"
    )
    parser.add_argument(
        "--baseline", choices=["seed"], help="also run the original system's behaviour"
    )
    parser.add_argument(
        "--speech-turns",
        type=int,
        help="TTFA turns per transport with the config's tts.engine, espeak if none "
        "(default 10, --short 2; 0 = none)",
    )
    args = parser.parse_args(argv)
    turns = args.turns if args.turns is not None else (3 if args.short else 20)
    cancels = args.cancels if args.cancels is not None else (2 if args.short else 5)
    if turns < 1 or cancels < 1:
        parser.error("--turns and --cancels must be at least 1")
    speech_turns = args.speech_turns if args.speech_turns is not None else (2 if args.short else 10)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ttft-suite-") as tmp:
        model = args.model
        if model is None:
            from voxtral_server.models.tiny import build_tiny

            model = str(build_tiny(Path(tmp) / "tiny", script=ANSWER))
        try:
            base = load_settings(args.config, {("model", "id"): model})
            audio = read_audio_file(args.audio)
        except Exception as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        audio_events = appends(audio)
        tts_engine = speech_engine(base)
        if speech_turns and tts_engine == "espeak" and shutil.which("espeak-ng") is None:
            print("note: espeak-ng is not installed: no speech (TTFA) pass", file=sys.stderr)
            speech_turns = 0
        variants = ["ours"] + ([args.baseline] if args.baseline else [])
        results: dict[str, Any] = {}
        try:
            for variant in variants:
                print(f"{variant}: {turns} TTFT turns and {cancels} cancel turns per transport")
                settings = settings_for(base, variant)
                results[variant] = measure_variant(
                    settings, audio_events, turns, cancels, args.mode
                )
            speech = None
            if speech_turns:
                print(f"speech: {speech_turns} TTFA turns per transport (tts.engine {tts_engine})")
                k = results["ours"]["vad_end_append"]
                speech = measure_speech(
                    base, audio_events, k, speech_turns, Path(tmp), run_on=args.model is None
                )
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    elapsed = time.perf_counter() - started

    target = base.performance_targets.ttft_ms
    mode = args.mode or base.mode
    seconds = len(audio) / 16000
    print(f"machine: {machine()}")
    print(f"model: {args.model or 'tiny scripted checkpoint'}  mode: {mode}  ", end="")
    print(f"audio: {args.audio.name} ({seconds:.1f} s)")
    print(
        f"per transport: {turns} TTFT turns, {cancels} cancel turns, one fresh conversation "
        "each; server VAD; times in ms"
    )
    for variant in variants:
        summary = results[variant]["summary"]
        print(f"\n{variant}:")
        print(timing_table(summary))
        if summary["all"]["not_cancelled"]:
            print(
                f"note: {summary['all']['not_cancelled']} of {summary['all']['cancel_turns']} "
                "cancel turns completed before the cancel took effect"
            )
    ratios = None
    if args.baseline:
        text, ratios = ratio_table(results)
        print("\nseed vs ours (ratio seed / ours; > 1 means ours is faster):")
        print(text)
    speech_summary = None
    if speech is not None:
        speech_summary, speech_table = summarise_speech(speech)
        print(f"\nspeech (tts.engine {tts_engine}; times in ms):")
        print(speech_table)
    print(f"\ngo/no-go (ours, both transports pooled; suite ran in {elapsed:.1f} s):")
    lines, verdicts = go_no_go(results["ours"]["summary"], target)
    if speech_summary is not None:
        lines.append(speech_line(speech_summary, tts_engine))
    for line in lines:
        print(line)

    path = write_json(
        "ttft_suite",
        {
            "model": args.model or "tiny scripted checkpoint",
            "mode": mode,
            "audio": args.audio.name,
            "turns_per_transport": turns,
            "cancels_per_transport": cancels,
            "targets": {
                "ttft_ms": target,
                "cancel_ms": CANCEL_TARGET_MS,
                "queue_wait_ok_ms": QUEUE_OK_MS,
            },
            "definitions": {
                key: label for label, key in {**TTFT_METRICS, **CANCEL_METRICS}.items()
            },
            "go_no_go": lines,
            "verdicts": verdicts,
            "variants": {v: VARIANTS[v] for v in variants},
            "results": results,
            "ratios_seed_over_ours": ratios,
            "speech": {"summary": speech_summary, "raw": speech},
            "elapsed_s": elapsed,
        },
    )
    print(f"wrote {path}")
    try:
        plot(results, target, OUT / "ttft_suite.png")
        print(f"wrote {OUT / 'ttft_suite.png'}")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
