"""Transport overhead: the first word's way from the engine to the transport, per transport.

    python benchmarks/transport.py [--model DIR_OR_HUB_ID] [--audio FILE] [--turns N]

Starts the real app (`create_app` with the default engine factory: the server loads the model
itself) under uvicorn on a free loopback port in this process, then runs push-to-talk turns on
one conversation per transport, WebSocket first, then WebRTC: session.update with
turn_detection null; the clip as input_audio_buffer.append events of 40 ms; a no-op
session.update round trip, so the server has taken all the audio before the commit is timed;
input_audio_buffer.commit and response.create back to back; read up to response.done.
WebRTC turns send these same events on the `oai-events` data channel (the session handles an
append there exactly as on the WebSocket) and open no audio track, so both transports carry
identical audio; the words come back on the channel. --warmup turns per transport are run
first and not counted. With no --model it builds a tiny scripted checkpoint (real
architecture, random weights, a fixed 11-word answer), so it runs offline on a CPU.

What each row measures (server rows come from the server's own perf_counter, in its events):
  client       commit sent -> first response.output_text.delta received (client perf_counter)
  first word   commit received -> first delta handed to the transport (timings.first_word_ms)
  overhead     first word chunk out of the engine -> first delta handed to the transport
               (timings.delivery_ms): the hop from the engine thread to the event loop, the
               session's work and the event's serialisation. The 3 ms target applies to it.
  token->delta model's first token -> first delta handed to the transport
               (timings.first_token_to_delta_ms) = word wait + overhead
  word wait    model's first token -> first word chunk out of the engine (processing_time_ms
               - first_token_latency_ms of the first delta): the decode steps until the token
               that completes the first word (whitespace after it). Model time, not overhead.
  model TTFT   engine worker picked the request up -> first token (timings.model_ttft_ms)
"Handed to the transport" is when `Transport.send` returns: the WebSocket's outbox queue, or
aiortc's data channel send queue; the socket write after it is only in the client row. Not
measured: the network stack on its own (client minus first word is both directions of the
wire plus client-side parsing). The client runs in the server's process (it shares the GIL).
Writes benchmarks/out/transport.json and transport.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _clients import WebRTCClient, WebSocketClient, appends, with_16k_input
from _common import OUT, machine, median, pct, table, write_json

from voxtral_server.api.app import create_app
from voxtral_server.api.inprocess import InProcessServer
from voxtral_server.config import Settings, load_settings
from voxtral_server.models.audio import read_audio_file

ANSWER = "Hello world, the quick brown fox jumps over the lazy dog."
OVERHEAD_TARGET_MS = 3.0  # p95, first word chunk out of the engine -> handed to the transport
METRICS = {  # row label -> per-turn key
    "client commit -> 1st delta": "client_ms",
    "server commit -> 1st delta": "first_word_ms",
    "overhead: chunk -> transport": "delivery_ms",
    "1st token -> transport": "first_token_to_delta_ms",
    "  of which word wait": "word_wait_ms",
    "model TTFT": "model_ttft_ms",
    "queue wait": "queue_wait_ms",
}
PTT = {
    "type": "session.update",
    "session": with_16k_input({"audio": {"input": {"turn_detection": None}}}),
}


# ----------------------------------------------------------------- server


def start_server(settings: Settings) -> InProcessServer:
    """The real app on a free loopback port, model loaded and warmed up."""
    return InProcessServer(create_app(settings)).start()


# ----------------------------------------------------------------- clients


Client = WebSocketClient | WebRTCClient


async def recv_until(client: Client, type_: str) -> tuple[float, dict[str, Any]]:
    while True:
        at, event = await asyncio.wait_for(client.recv(), 120)
        if event["type"] == "error":
            raise RuntimeError(f"{client.name}: server error {event['error']}")
        if event["type"] == type_:
            return at, event


async def run_turn(client: Client, audio_events: list[str]) -> dict[str, Any]:
    for text in audio_events:
        await client.send(text)
    await client.send(json.dumps(PTT))  # a barrier: every append is in the buffer after it
    await recv_until(client, "session.updated")
    sent = time.perf_counter()
    await client.send(json.dumps({"type": "input_audio_buffer.commit"}))
    await client.send(json.dumps({"type": "response.create"}))
    first_at, first = await recv_until(client, "response.output_text.delta")
    _, done = await recv_until(client, "response.done")
    if done["response"]["status"] != "completed":
        raise RuntimeError(f"{client.name}: response {done['response']}")
    t = done["timings"]
    if t.get("transport") != client.name:
        raise RuntimeError(f"{client.name}: timings say transport {t.get('transport')!r}")
    word_wait = None
    if first.get("first_token_latency_ms") is not None:
        word_wait = round(first["processing_time_ms"] - first["first_token_latency_ms"], 3)
    return {
        "client_ms": (first_at - sent) * 1000,
        "first_word_ms": t.get("first_word_ms"),
        "delivery_ms": t.get("delivery_ms"),
        "first_token_to_delta_ms": t.get("first_token_to_delta_ms"),
        "word_wait_ms": word_wait,
        "model_ttft_ms": t.get("model_ttft_ms"),
        "queue_wait_ms": t.get("queue_wait_ms"),
        "words": t.get("words"),
    }


async def run_transport(
    client: Client, base_url: str, audio_events: list[str], turns: int, warmup: int
) -> list[dict[str, Any]]:
    await client.connect(base_url)
    try:
        await recv_until(client, "session.created")
        await client.send(json.dumps(PTT))
        await recv_until(client, "session.updated")
        for _ in range(warmup):
            await run_turn(client, audio_events)
        return [await run_turn(client, audio_events) for _ in range(turns)]
    finally:
        await client.close()


async def run_all(
    base_url: str, audio_events: list[str], turns: int, warmup: int
) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for client in (WebSocketClient(), WebRTCClient()):
        t0 = time.perf_counter()
        out[client.name] = await run_transport(client, base_url, audio_events, turns, warmup)
        print(f"{client.name}: {turns} turns in {time.perf_counter() - t0:.1f} s")
    return out


# ----------------------------------------------------------------- report


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    out: dict[str, dict[str, float | int]] = {}
    for key in METRICS.values():
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = {
            "n": len(values),
            "p50": median(values),
            "p95": pct(values, 95),
            "max": max(values, default=float("nan")),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="hub id or folder (default: a tiny scripted checkpoint)")
    parser.add_argument("--config", type=Path, help="config file (default: ./config.yaml)")
    parser.add_argument(
        "--audio", type=Path, default=Path(__file__).parent.parent / "static" / "sample.wav"
    )
    parser.add_argument("--turns", type=int, default=50, help="counted turns per transport")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted turns per transport")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.model is None:
        from voxtral_server.models.tiny import build_tiny

        args.model = str(build_tiny(Path(tempfile.mkdtemp()) / "tiny", script=ANSWER))
    settings = load_settings(args.config, {("model", "id"): args.model})
    audio = read_audio_file(args.audio)
    audio_events = appends(audio)

    t0 = time.perf_counter()
    server = start_server(settings)
    base_url = server.base_url
    print(f"server up at {base_url} in {time.perf_counter() - t0:.1f} s (load + warm-up)")
    try:
        raw = asyncio.run(run_all(base_url, audio_events, args.turns, args.warmup))
    finally:
        server.stop()
    results = {name: summarise(rows) for name, rows in raw.items()}

    rows = []
    for label, key in METRICS.items():
        for name, summary in results.items():
            s = summary[key]
            rows.append([label, name, s["n"], s["p50"], s["p95"], s["max"]])
    print(f"machine: {machine()}")
    seconds = len(audio) / 16000
    print(f"model: {args.model}  mode: {settings.mode}  audio: {args.audio.name} ({seconds:.1f} s)")
    print(f"push-to-talk turns per transport: {args.turns} (+{args.warmup} warm-up); times in ms")
    print(table(["measure", "transport", "n", "p50", "p95", "max"], rows))
    verdicts = {}
    for name, summary in results.items():
        value = summary["delivery_ms"]["p95"]
        ok = value <= OVERHEAD_TARGET_MS  # NaN (field missing) fails
        verdicts[name] = "PASS" if ok else "FAIL"
        print(
            f"• {name}: overhead (first word chunk out of the engine -> handed to the "
            f"transport) p95 {value:.2f} ms (target ≤ {OVERHEAD_TARGET_MS:g} ms) — "
            f"{verdicts[name]}"
        )
    path = write_json(
        "transport",
        {
            "model": args.model,
            "mode": settings.mode,
            "audio": args.audio.name,
            "turns": args.turns,
            "warmup": args.warmup,
            "definitions": {key: label for label, key in METRICS.items()},
            "overhead_target_ms": OVERHEAD_TARGET_MS,
            "verdicts": verdicts,
            "results": results,
            "raw": raw,
        },
    )
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, turns in raw.items():
            values = np.sort([r["client_ms"] for r in turns])
            ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=name)
        ax.set_xlabel("commit sent -> first delta received (ms, client clock)")
        ax.set_ylabel("fraction of turns")
        ax.set_title(f"push-to-talk, {args.turns} turns per transport")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "transport.png", dpi=110)
        print(f"wrote {OUT / 'transport.png'}")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
