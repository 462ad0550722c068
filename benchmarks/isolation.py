"""Can one client stall the others, and what does an idle session cost the server?

Runs `voxtral-server serve` on a tiny scripted checkpoint as a separate process (so its CPU
time and memory are its own) and measures:

- `/healthz` latency, p50/p95 over sequential GETs: idle, then while one WebSocket client
  floods `input_audio_buffer.append` events of ~1 MiB (24 s of audio each) under server VAD;
- CPU of open, silent WebRTC sessions (aiortc peers sending 20 ms frames of silence), in
  cores per session: server CPU time with N sessions minus with none;
- memory per idle session: the server's RSS after opening 8 WebSocket sessions (server VAD
  on), minus before, divided by M.

`--baseline-python PATH` runs the same measurements against another installation (e.g. a
virtualenv with the previous release) in the same run, for a side-by-side table.

    python benchmarks/isolation.py [--baseline-python ~/.cache/voxtral-server-ci/venv/bin/python]
        [--healthz-only] [--gets 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import websockets
from _clients import DECLARE_16K, WebRTCClient
from _common import pct, table, write_json

from voxtral_server.api.inprocess import free_port
from voxtral_server.models.tiny import build_tiny

SCRIPT = "Hello! This is a tiny Voxtral answering."
FLOOD_SECONDS = 24.0  # audio per flood event: ~1 MiB of JSON, under server.max_event_bytes
GETS = 300  # per window; at ~2 ms a GET, 300 see less than one paced flood event: try 3000


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def server(python: str, model: Path, workdir: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    log = (workdir / f"server-{port}.log").open("w")
    proc = subprocess.Popen(
        [python, "-m", "voxtral_server.cli", "serve", "--model", str(model), "--port", str(port)]
        + ["--tts", "none"],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: see {log.name}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # polling a starting server
        else:
            raise RuntimeError(f"server not ready in 300 s: see {log.name}")
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def healthz_ms(base: str, count: int = GETS) -> list[float]:
    times = []
    with httpx.Client(timeout=30) as http:
        for _ in range(count):
            t0 = time.perf_counter()
            http.get(f"{base}/healthz").raise_for_status()
            times.append((time.perf_counter() - t0) * 1000)
    return times


def flood_event() -> str:
    rng = np.random.default_rng(1)
    n = int(FLOOD_SECONDS * 16000)
    t = np.arange(n) / 16000
    voiced = 0.2 * np.sin(2 * np.pi * 140 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    pcm = (np.clip(voiced + 0.02 * rng.standard_normal(n), -1, 1) * 32767).astype("<i2")
    return json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm.tobytes()).decode()}
    )


class Flood:
    """One WebSocket client sending flood events as fast as the server takes them."""

    def __init__(self, base: str) -> None:
        self.url = base.replace("http", "ws", 1) + "/v1/realtime"
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        event = flood_event()
        async with websockets.connect(self.url, max_size=None) as ws:
            await ws.send(DECLARE_16K)

            async def drain() -> None:
                async for _ in ws:
                    pass

            reader = asyncio.create_task(drain())
            while not self._stop.is_set():
                await ws.send(event)
                self.sent += 1
            reader.cancel()

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


async def _silent_calls(base: str, count: int, seconds: float, pid: int) -> float:
    """Server CPU cores used while `count` silent WebRTC calls stay open for `seconds`."""
    from aiortc.mediastreams import AudioStreamTrack

    clients = []
    for _ in range(count):
        # The base AudioStreamTrack sends 20 ms frames of silence in real time.
        client = WebRTCClient(microphone=AudioStreamTrack())
        await client.connect(base)
        clients.append(client)
    for client in clients:  # wait for session.created on each
        await asyncio.wait_for(client.recv(), 30)
    cpu0, t0 = _proc_cpu_s(pid), time.monotonic()
    await asyncio.sleep(seconds)  # measuring a window of real time, not synchronising
    used = (_proc_cpu_s(pid) - cpu0) / (time.monotonic() - t0)
    for client in clients:
        await client.close()
    return used


async def _idle_sessions_mb(base: str, count: int, pid: int) -> float:
    url = base.replace("http", "ws", 1) + "/v1/realtime"
    before = _rss_mb(pid)
    sockets = []
    for _ in range(count):
        ws = await websockets.connect(url)
        json.loads(await ws.recv())  # session.created: the session (and its VAD) exists
        sockets.append(ws)
    # A few frames of silence each, so per-session VAD state is really in use.
    silence = json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(6400)).decode()}
    )
    for ws in sockets:
        await ws.send(silence)
    async with httpx.AsyncClient() as http:
        await http.get(f"{base}/healthz")
    after = _rss_mb(pid)
    for ws in sockets:
        await ws.close()
    return (after - before) / count


def measure_cpu(base: str, pid: int, seconds: float) -> dict[str, float]:
    """Cores per silent WebRTC session with 1 and 4 open, over the server's idle CPU."""
    base_cpu = asyncio.run(_silent_calls(base, 0, seconds, pid))
    four_cpu = asyncio.run(_silent_calls(base, 4, seconds, pid))
    one_cpu = asyncio.run(_silent_calls(base, 1, seconds, pid))
    return {
        "cpu_idle_server_cores": base_cpu,
        "cpu_per_silent_webrtc_session_1": one_cpu - base_cpu,
        "cpu_per_silent_webrtc_session_4": (four_cpu - base_cpu) / 4,
    }


def measure(
    python: str,
    model: Path,
    workdir: Path,
    label: str,
    only_cpu: bool = False,
    seconds: float = 10,
    healthz_only: bool = False,
    gets: int = GETS,
) -> dict[str, Any]:
    nan = float("nan")
    cpu: dict[str, float] = {}
    mb = nan
    with server(python, model, workdir) as (base, pid):
        if not healthz_only:
            # Quiet measurements first: the flood leaves work behind it.
            cpu = measure_cpu(base, pid, seconds)
            if only_cpu:
                return {"label": label, "python": python, **cpu}
            # 8: the default per-address cap (server.max_sessions_per_client)
            mb = asyncio.run(_idle_sessions_mb(base, 8, pid))
        healthz_ms(base, 50)  # warm the connection path
        idle = healthz_ms(base, gets)
        with Flood(base) as flood:
            while flood.sent < 2:  # the flood is under way
                time.sleep(0.05)
            cpu0, t0 = _proc_cpu_s(pid), time.monotonic()
            flooded = healthz_ms(base, gets)
            flood_cores = (_proc_cpu_s(pid) - cpu0) / (time.monotonic() - t0)
            events = flood.sent
    result = {
        "label": label,
        "python": python,
        "healthz_idle_p50_ms": pct(idle, 50),
        "healthz_idle_p95_ms": pct(idle, 95),
        "healthz_flood_p50_ms": pct(flooded, 50),
        "healthz_flood_p95_ms": pct(flooded, 95),
        "healthz_flood_max_ms": max(flooded),
        "flood_events": events,
        "server_cores_while_flooding": flood_cores,
        "cpu_idle_server_cores": cpu.get("cpu_idle_server_cores", nan),
        "cpu_per_silent_webrtc_session_1": cpu.get("cpu_per_silent_webrtc_session_1", nan),
        "cpu_per_silent_webrtc_session_4": cpu.get("cpu_per_silent_webrtc_session_4", nan),
        "mb_per_idle_session": mb,
    }
    result["healthz_flood_over_idle_p95"] = (
        result["healthz_flood_p95_ms"] / result["healthz_idle_p95_ms"]
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the server's interpreter")
    parser.add_argument("--baseline-python", help="another installation, measured too")
    parser.add_argument(
        "--only-cpu", action="store_true", help="only the CPU of silent WebRTC sessions"
    )
    parser.add_argument(
        "--cpu-seconds", type=float, default=10.0, help="window per CPU measurement (s)"
    )
    parser.add_argument(
        "--healthz-only", action="store_true", help="only /healthz idle and under a flood"
    )
    parser.add_argument("--gets", type=int, default=GETS, help="/healthz GETs per window")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = build_tiny(workdir / "tiny", script=SCRIPT)
        runs = [("this checkout", args.python)]
        if args.baseline_python:
            runs.insert(0, ("baseline", args.baseline_python))
        results = [
            measure(
                py,
                model,
                workdir,
                label,
                args.only_cpu,
                args.cpu_seconds,
                args.healthz_only,
                args.gets,
            )
            for label, py in runs
        ]
    rows = [
        ("/healthz p95 idle (ms)", "healthz_idle_p95_ms"),
        ("/healthz p95 while one client floods (ms)", "healthz_flood_p95_ms"),
        ("/healthz max while flooding (ms)", "healthz_flood_max_ms"),
        ("flood p95 / idle p95 (target <= 2)", "healthz_flood_over_idle_p95"),
        ("server CPU while flooding (cores, GETs included)", "server_cores_while_flooding"),
        ("CPU per silent WebRTC session, 1 open (cores)", "cpu_per_silent_webrtc_session_1"),
        (
            "CPU per silent WebRTC session, 4 open (cores, target <= 0.03)",
            "cpu_per_silent_webrtc_session_4",
        ),
        ("memory per idle session, 8 open (MB, target <= 2)", "mb_per_idle_session"),
    ]
    rows = [(name, key) for name, key in rows if key in results[0]]
    headers = ["measure", *(r["label"] for r in results)]
    print(table(headers, [[name, *(float(r[key]) for r in results)] for name, key in rows]))
    path = write_json("isolation-cpu" if args.only_cpu else "isolation", {"runs": results})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
