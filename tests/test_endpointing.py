"""The endpointing benchmark runs in its quick mode over both transports (the WebRTC one with
a real aiortc microphone track): a turn per complete clip, and a pause longer than the
silence timer is reported as a premature commit."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType
from typing import Any

import pytest
from conftest import REPO

pytest.importorskip("piper", reason="piper-tts (the test extra) is not installed")

BENCHMARKS = REPO / "benchmarks"


def load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared helper modules
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up by name
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_quick_server_vad_run_on_both_transports_reports_a_turn_per_complete_clip(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = load("endpointing")
    mode = '{"type": "server_vad", "silence_duration_ms": 500}'
    # A 1000 ms pause is twice the timer: every paused clip must be committed in its pause.
    argv = ["--quick", "--mode", mode, "--pause-ms", "1000", "--name", "endpointing_test"]
    assert bench.main([*argv, "--transport", "websocket", "--transport", "webrtc"]) == 0
    out = capsys.readouterr().out
    assert '{"type":"server_vad","silence_duration_ms":500}' in out

    data = json.loads((bench.OUT / "endpointing_test.json").read_text())
    results = list(data["results"].values())
    assert [r["transport"] for r in results] == ["websocket", "webrtc"]
    for result in results:
        assert result["transport"] in out
        check(bench, result, json.loads(mode))
    assert (bench.OUT / "endpointing_test.png").is_file()


def check(bench: ModuleType, result: dict[str, Any], mode: dict[str, Any]) -> None:
    assert result["mode"] == mode
    clips = result["clips"]
    complete = [c for c in clips if c["kind"] == "complete"]
    paused = [c for c in clips if c["kind"] == "paused"]
    assert len(complete) == len(paused) == bench.QUICK_CLIPS
    for clip in complete:
        assert clip["turns"] == 1 and not clip["premature"] and not clip["timed_out"], clip
        # The timer starts at the end of speech: the commit and the first word come after it.
        assert 0 < clip["committed_ms"] < clip["first_word_ms"], clip
    for clip in paused:
        assert clip["turns"] == 2 and clip["premature"], clip
    summary = result["summary"]
    assert summary["complete_one_turn"] == summary["complete_clips"] == bench.QUICK_CLIPS
    assert summary["paused_premature"] == summary["paused_clips"]
