"""TTFT you can trust: one log line per turn, the ttft command, /metrics."""

from __future__ import annotations

import io
import json
import logging
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from clients import Client, TtftLines, cli, ptt_events, ttft_lines, ws_until
from conftest import REPO
from prometheus_client.parser import text_string_to_metric_families
from servers import running_server

from voxtral_server import ttft
from voxtral_server.api.metrics import (
    FIELDS,
    Metrics,
    TurnRecord,
    format_line,
    parse_line,
)
from voxtral_server.config import Settings
from voxtral_server.models.voxtral import VoxtralEngine


@pytest.fixture
def lines() -> Iterator[TtftLines]:
    with ttft_lines() as handler:
        yield handler


@pytest.fixture(scope="module")
def server(scripted_engine: VoxtralEngine) -> Iterator[tuple[str, Any]]:
    settings = Settings.model_validate({"logging": {"client_report_wait_ms": 30_000}})
    with running_server(settings, scripted_engine) as running:
        yield running


async def scrape(url: str) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{url}/metrics")).text


def metric_value(text: str, name: str, labels: dict[str, str]) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@pytest.mark.asyncio
async def test_a_websocket_turn_writes_one_line_with_the_browser_figure(
    server: tuple[str, Any], lines: TtftLines
) -> None:
    url, _app = server
    before = await scrape(url)
    async with websockets.connect(url.replace("http", "ws") + "/v1/realtime") as ws:
        for event in ptt_events():
            await ws.send(event)
        done = await ws_until(ws, "response.done")
        assert not lines.lines  # the line waits for the browser's own measurement
        report = {"response_id": done["response"]["id"], "first_word_ms": 123.4}
        await ws.send(json.dumps({"type": "voxtral.client_timing", **report}))
        (record,) = lines.wait_for(1)
    assert record.transport == "websocket" and record.status == "completed"
    assert record.client_first_word_ms == pytest.approx(123.4)
    assert record.mode == "chat" and record.words == 11 and record.tokens > 0
    for name in ("model_ttft_ms", "first_word_ms", "queue_wait_ms", "total_ms", "tok_s"):
        assert getattr(record, name) is not None, name
    assert record.first_word_ms == pytest.approx(done["timings"]["first_word_ms"], abs=0.1)
    line = lines.lines[0]
    assert line.startswith("TTFT session=sess_") and all(f" {f}=" in line for f in FIELDS[1:])
    after = await scrape(url)
    turns = {"status": "completed", "transport": "websocket"}
    assert metric_value(after, "voxtral_turns_total", turns) == (
        metric_value(before, "voxtral_turns_total", turns) + 1
    )
    assert metric_value(after, "voxtral_browser_first_word_seconds_count", {}) == (
        metric_value(before, "voxtral_browser_first_word_seconds_count", {}) + 1
    )


@pytest.mark.asyncio
async def test_a_webrtc_turn_writes_one_line_when_the_client_leaves(
    server: tuple[str, Any], lines: TtftLines
) -> None:
    url, _app = server
    client = Client()
    try:
        await client.connect(url)  # server VAD on the wav played into the track
        await client.wait_for("response.done")
    finally:
        await client.close()  # no report sent: the line goes out when the session ends
    (record,) = lines.wait_for(1)
    assert record.transport == "webrtc" and record.status == "completed"
    assert record.client_first_word_ms is None
    assert "client_first_word_ms=-" in lines.lines[0]


@pytest.mark.asyncio
async def test_a_cancelled_turn_says_so(
    long_answer_server: tuple[str, Any], lines: TtftLines
) -> None:
    url, _app = long_answer_server
    before = await scrape(url)
    async with websockets.connect(url.replace("http", "ws") + "/v1/realtime") as ws:
        for event in ptt_events():
            await ws.send(event)
        await ws_until(ws, "response.output_text.delta")
        await ws.send(json.dumps({"type": "response.cancel"}))
        await ws_until(ws, "response.done")
    (record,) = lines.wait_for(1)
    assert record.status == "cancelled" and record.cancel_latency_ms is not None
    after = await scrape(url)
    labels = {"status": "cancelled", "transport": "websocket"}
    assert metric_value(after, "voxtral_turns_total", labels) == (
        metric_value(before, "voxtral_turns_total", labels) + 1
    )
    assert metric_value(after, "voxtral_cancel_latency_seconds_count", {}) >= 1


@pytest.fixture(scope="module")
def long_answer_server(long_engine: VoxtralEngine) -> Iterator[tuple[str, Any]]:
    with running_server(Settings(), long_engine) as running:
        yield running


@pytest.fixture(scope="module")
def long_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VoxtralEngine]:
    from conftest import engine_settings

    from voxtral_server.models.tiny import build_tiny

    model = build_tiny(tmp_path_factory.mktemp("tiny-long-metrics"), script="w " * 200)
    engine = VoxtralEngine.load(engine_settings(model, model={"max_new_tokens": 800}))
    yield engine
    engine.close()


def test_metrics_endpoint_parses_and_has_every_series(server: tuple[str, Any]) -> None:
    url, _app = server
    text = httpx.get(f"{url}/metrics").text
    names = {family.name for family in text_string_to_metric_families(text)}
    for name in (
        "voxtral_model_ttft_seconds",
        "voxtral_first_word_seconds",
        "voxtral_browser_first_word_seconds",
        "voxtral_queue_wait_seconds",
        "voxtral_turn_total_seconds",
        "voxtral_cancel_latency_seconds",
        "voxtral_turns",
        "voxtral_errors",
        "voxtral_transport_fallbacks",
        "voxtral_sessions",
        "voxtral_queue_depth",
    ):
        assert name in names, name


def test_errors_and_fallbacks_are_counted() -> None:
    metrics = Metrics()
    metrics.error("sess_1", "invalid_json", "bad")
    metrics.fallback("sess_1", "WebRTC did not connect within 3000 ms")
    text = metrics.exposition().decode()
    assert metric_value(text, "voxtral_errors_total", {"code": "invalid_json"}) == 1
    assert metric_value(text, "voxtral_transport_fallbacks_total", {}) == 1


# ------------------------------------------------------------------ the log format and ttft


def _record(i: int, rng: np.random.Generator) -> TurnRecord:
    return TurnRecord(
        session=f"sess_{i % 3}",
        turn=i,
        transport="webrtc" if i % 2 else "websocket",
        mode="chat",
        status="cancelled" if i % 7 == 0 else "completed",
        model_ttft_ms=float(rng.uniform(20, 200)),
        first_word_ms=float(rng.uniform(30, 300)),
        client_first_word_ms=None if i % 5 == 0 else float(rng.uniform(40, 900)),
        queue_wait_ms=float(rng.uniform(0, 5)),
        total_ms=float(rng.uniform(100, 2000)),
        words=int(rng.integers(1, 60)),
        tokens=int(rng.integers(1, 200)),
        tok_s=float(rng.uniform(100, 600)),
    )


def test_log_line_round_trips() -> None:
    record = _record(3, np.random.default_rng(0))
    parsed = parse_line("2026-11-22 08:00:00,000 INFO voxtral_server.ttft: " + format_line(record))
    assert parsed is not None
    for name in FIELDS:
        want, got = getattr(record, name), getattr(parsed, name)
        assert got == (round(want, 1) if isinstance(want, float) else want), name
    assert parse_line("INFO something else entirely") is None


def _fixture_log(path: Path, n: int) -> list[TurnRecord]:
    rng = np.random.default_rng(42)
    records = [_record(i, rng) for i in range(n)]
    with path.open("w") as f:
        for r in records:
            f.write("2026-11-22 08:00:00,000 INFO uvicorn: noise line\n")
            f.write(f"2026-11-22 08:00:00,000 INFO voxtral_server.ttft: {format_line(r)}\n")
    return [parse_line(format_line(r)) for r in records]  # type: ignore[misc]


def test_ttft_prints_the_right_percentiles(tmp_path: Path) -> None:
    log = tmp_path / "voxtral_streaming.log"
    records = _fixture_log(log, 200)
    out = io.StringIO()
    assert ttft.run(log, out, last=150) == 0
    table = out.getvalue()
    window = records[-150:]
    assert table.startswith("150 turns")
    for name in ("model_ttft_ms", "client_first_word_ms", "total_ms"):
        values = [getattr(r, name) for r in window if getattr(r, name) is not None]
        row = next(line for line in table.splitlines() if line.startswith(name))
        n, *cells = row.split()[1:]
        assert int(n) == len(values)
        for cell, q in zip(cells, (50, 95, 99), strict=True):
            assert float(cell) == pytest.approx(np.percentile(values, q), abs=0.051)
    statuses = {r.status for r in window}
    assert all(f"{s}=" in table for s in statuses)
    assert "transport: webrtc=75, websocket=75" in table


def test_ttft_follow_picks_up_new_lines(tmp_path: Path) -> None:
    log = tmp_path / "live.log"
    records = _fixture_log(log, 4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "voxtral_server.cli", "ttft", str(log), "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    out: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [out.put(x) for x in proc.stdout], daemon=True)  # type: ignore[union-attr]
    reader.start()

    def wait_line(prefix: str) -> str:
        while True:
            line = out.get(timeout=30)
            if prefix in line:
                return line

    try:
        assert wait_line("turns").startswith("4 turns")
        with log.open("a") as f:
            for r in records[:3]:
                f.write(f"x INFO voxtral_server.ttft: {format_line(r)}\n")
        assert "7 turns" in wait_line("turns")
    finally:
        proc.terminate()
        proc.wait(10)


def test_ttft_on_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    run = cli("ttft", str(tmp_path / "nope.log"))
    assert run.returncode == 2 and "no such log file" in run.stderr


def test_serve_logs_turns_to_the_rotating_file(tmp_path: Path) -> None:
    from voxtral_server.cli import _log_to_file

    path = tmp_path / "logs" / "voxtral_streaming.log"
    settings = Settings.model_validate({"logging": {"file": str(path)}})
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # What `serve`'s entry point sets up (basicConfig at INFO); this test used to pass only
    # after others had left the TTFT logger at INFO.
    root.setLevel(logging.INFO)
    _log_to_file(settings)
    try:
        Metrics().turn(_record(1, np.random.default_rng(1)))
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
    parsed = [r for r in map(parse_line, path.read_text().splitlines()) if r is not None]
    assert len(parsed) == 1 and parsed[0].turn == 1
