"""The command line as an operator uses it: real processes, stdout and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from clients import cli
from conftest import SAMPLE_WAV, SCRIPT
from patience import LineWatcher, NotReady, scaled


def test_transcribe_prints_the_scripted_words_one_chunk_per_line(tiny_scripted: Path) -> None:
    run = cli("transcribe", "--model", str(tiny_scripted), str(SAMPLE_WAV))
    assert run.returncode == 0, run.stderr
    chunks = [json.loads(line) for line in run.stdout.splitlines()]  # nothing but JSON
    words, final = chunks[:-1], chunks[-1]
    assert [c["text"].strip() for c in words] == SCRIPT.split()
    assert all(not c["is_final"] for c in words)
    for c in words:
        assert {
            "text",
            "chunk_index",
            "is_final",
            "first_token_latency_ms",
            "processing_time_ms",
        } <= set(c)
    assert final["is_final"] and final["status"] == "completed"
    assert final["answer"] == SCRIPT
    for key in ("tokens", "words", "total_ms", "tokens_per_s", "queue_wait_ms"):
        assert key in final
    assert "model loaded" in run.stderr  # logs go to stderr


def test_chat_with_a_prompt(tiny_scripted: Path) -> None:
    run = cli("chat", "--model", str(tiny_scripted), str(SAMPLE_WAV), "--prompt", "Be brief.")
    assert run.returncode == 0, run.stderr
    final = json.loads(run.stdout.splitlines()[-1])
    assert final["answer"] == SCRIPT


def test_make_tiny_then_load_it(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    run = cli("make-tiny", str(out), "--script", "one two three")
    assert run.returncode == 0, run.stderr
    assert (out / "config.json").is_file() and (out / "tekken.json").is_file()
    again = cli("make-tiny", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr
    chat = cli("chat", "--model", str(out), str(SAMPLE_WAV))
    assert json.loads(chat.stdout.splitlines()[-1])["answer"] == "one two three"


def test_make_tiny_is_deterministic(tmp_path: Path) -> None:
    from voxtral_server.models.tiny import build_tiny

    a = build_tiny(tmp_path / "a", script="same words")
    b = build_tiny(tmp_path / "b", script="same words")
    for name in ("model.safetensors", "tekken.json", "generation_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_unreadable_audio_is_a_clear_error(tiny_scripted: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio")
    run = cli("transcribe", "--model", str(tiny_scripted), str(bad))
    assert run.returncode == 2
    assert "cannot decode audio" in run.stderr and run.stdout == ""


def test_missing_weights_name_the_model_and_make_tiny() -> None:
    run = cli("chat", "--model", "mistralai/Voxtral-Mini-3B-2507", str(SAMPLE_WAV))
    assert run.returncode == 1
    assert "mistralai/Voxtral-Mini-3B-2507" in run.stderr and "make-tiny" in run.stderr
    assert "Traceback" not in run.stderr


def test_bad_config_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  compile: sometimes\n")
    run = cli("chat", "--config", str(config), str(SAMPLE_WAV))
    assert run.returncode == 2
    assert "model.compile" in run.stderr and "'auto', 'on' or 'off'" in run.stderr


def test_demo_streams_words_from_the_sample_clip(tmp_path: Path) -> None:
    run = cli("demo", "--clip", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    chunks = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(chunks) > 10 and chunks[-1]["status"] == "completed"
    assert all(len(c["text"].split()) == 1 for c in chunks[:-1])


def test_demo_serves_the_page_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    import signal

    import httpx
    from servers import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "voxtral_server.cli", "demo", "--port", str(port)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,  # logs/ lands here
        env={**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path)},
    )
    assert proc.stderr is not None
    stderr = LineWatcher(proc.stderr, "`voxtral-server demo`")
    try:
        try:  # the server's own word that the model is ready
            stderr.wait_for(lambda line: "engine ready" in line, base_s=120, cap_s=600)
        except NotReady as exc:
            pytest.fail(str(exc), pytrace=False)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/readyz").json()["status"] == "ready"
        assert "<title>voxtral-server</title>" in httpx.get(f"{base}/").text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(scaled(30, 120))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    rest = stderr.rest(timeout=10)  # the stream is closed: this returns at once
    assert proc.returncode == 0, stderr.tail_text()
    assert "server stopped" in rest
    assert (tmp_path / "logs" / "voxtral_streaming.log").is_file()
