"""Captions of the user's words: do they hold up the answer's first word?

    python benchmarks/captions.py [--turns N] [--model DIR] [--audio FILE]

Starts the real app in this process (tiny scripted checkpoint by default, the serial engine
worker) and runs one push-to-talk chat conversation per condition over the WebSocket, turns
interleaved (off, on, off, on, ...) so both see the same machine:
  off  no `audio.input.transcription`: the answer is the only work
  on   captions on: every committed turn is also written down by the same engine, at the
       lowest priority; the next turn starts as soon as the previous answer is done, so its
       answer arrives while that turn's caption still runs (the case that could delay it)
Per condition: the client's first word (response.create sent -> first transcript/text delta
received) and the server's timings.first_word_ms, p50/p95; for "on", commit -> caption
completed. Writes benchmarks/out/captions.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _clients import appends, with_16k_input
from _common import OUT, machine, pct, table, write_json

from voxtral_server.api.app import create_app
from voxtral_server.api.inprocess import InProcessServer
from voxtral_server.config import load_settings
from voxtral_server.models.audio import read_audio_file

ROOT = Path(__file__).resolve().parent.parent


async def conversation(url: str, captions: bool) -> Any:
    import websockets

    ws = await websockets.connect(url, max_size=16 * 1024 * 1024)
    session: dict[str, Any] = {
        "output_modalities": ["text"],
        "audio": {"input": {"turn_detection": None}},
    }
    if captions:
        session["audio"]["input"]["transcription"] = {"model": "voxtral"}
    await ws.send(json.dumps({"type": "session.update", "session": with_16k_input(session)}))
    return ws


async def turn(
    ws: Any, clip: list[str], stats: dict[str, list[float]], pending: dict[str, float]
) -> None:
    """One turn: the clip, commit, response.create; back once response.done arrived (caption
    completions of earlier turns are noted as they come)."""
    for message in clip:
        await ws.send(message)
    committed_at = time.perf_counter()
    await ws.send('{"type": "input_audio_buffer.commit"}')
    asked = time.perf_counter()
    await ws.send('{"type": "response.create"}')
    first: float | None = None
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), 120))
        now = time.perf_counter()
        kind = event["type"]
        if kind == "input_audio_buffer.committed":
            pending[event["item_id"]] = committed_at
        elif kind.endswith("input_audio_transcription.completed"):
            stats["caption_ms"].append((now - pending.pop(event["item_id"])) * 1000)
        elif kind in ("response.output_text.delta", "response.output_audio_transcript.delta"):
            if first is None:
                first = now
        elif kind == "response.done":
            assert event["response"]["status"] == "completed", event
            assert first is not None
            stats["client_ms"].append((first - asked) * 1000)
            stats["server_ms"].append(event["timings"]["first_word_ms"])
            return
        elif kind == "error":
            raise RuntimeError(event["error"])


async def run(url: str, clip: list[str], turns: int) -> dict[str, dict[str, list[float]]]:
    results = {c: {"client_ms": [], "server_ms": [], "caption_ms": []} for c in ("off", "on")}
    sockets = {"off": await conversation(url, False), "on": await conversation(url, True)}
    pending: dict[str, dict[str, float]] = {"off": {}, "on": {}}
    for i in range(turns + 1):
        for name in ("off", "on"):
            stats = results[name] if i else {"client_ms": [], "server_ms": [], "caption_ms": []}
            await turn(sockets[name], clip, stats, pending[name])  # turn 0 warms up
    # The last captions.
    ws = sockets["on"]
    while pending["on"]:
        event = json.loads(await asyncio.wait_for(ws.recv(), 120))
        if event["type"].endswith("input_audio_transcription.completed"):
            at = pending["on"].pop(event["item_id"])
            results["on"]["caption_ms"].append((time.perf_counter() - at) * 1000)
    for ws in sockets.values():
        await ws.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--model", help="checkpoint (default: a tiny scripted one)")
    parser.add_argument("--audio", default=str(ROOT / "static" / "sample.wav"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from voxtral_server.models.tiny import build_tiny

            model = str(build_tiny(Path(tmp) / "tiny", script="Hello there, how are you today?"))
        settings = load_settings(None, {("model", "id"): model, ("tts", "engine"): "none"})
        clip = appends(read_audio_file(Path(args.audio)))
        server = InProcessServer(create_app(settings)).start()
        try:
            results = asyncio.run(run(server.realtime_url, clip, args.turns))
        finally:
            server.stop()
    rows = []
    for name, stats in results.items():
        row = [name, len(stats["client_ms"])]
        for key in ("client_ms", "server_ms"):
            row += [f"{pct(stats[key], 50):.1f}", f"{pct(stats[key], 95):.1f}"]
        captions = stats["caption_ms"]
        row += [f"{pct(captions, 50):.0f}" if captions else "-"]
        rows.append(row)
    off, on = results["off"], results["on"]
    ratio = pct(on["client_ms"], 50) / pct(off["client_ms"], 50)
    print(table(
        ["captions", "turns", "client 1st word p50", "p95", "server 1st word p50", "p95",
         "commit -> caption p50"],
        rows,
    ))  # fmt: skip
    print(f"first word with captions / without (client p50): {ratio:.2f}")
    write_json(
        "captions",
        {"machine": machine(), "turns": args.turns, "results": results, "ratio_p50": ratio},
    )
    print(f"wrote {OUT / 'captions.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
