"""The TTFT suite runs inside the test command, in its short mode, and says go or no-go."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from types import ModuleType

import pytest
from conftest import REPO

BENCHMARKS = REPO / "benchmarks"


def load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared _common module
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_ttft_suite_short_mode_prints_the_three_go_no_go_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    suite = load("ttft_suite")  # writes its JSON and plot to benchmarks/out/ (not committed)
    assert suite.main(["--short"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("• ")]
    speech = shutil.which("espeak-ng") is not None
    # The three go/no-go lines, the server-overhead line, and with espeak-ng the speech line.
    assert len(lines) == (5 if speech else 4), out
    if speech:
        assert lines[4].startswith("• Speech (espeak): TTFA p50") and "run-on answer" in lines[4]
    assert lines[0].startswith("• TTFT (streaming) p95:") and "target ≤" in lines[0]
    assert lines[1].startswith("• Cancel latency:") and "target < 300 ms" in lines[1]
    assert lines[2].startswith("• Queue wait p95 (TTFT run):")
    assert lines[3].startswith("• First word - model TTFT p95:") and "target ≤ 3 ms" in lines[3]
    assert all(line.rstrip().endswith(("PASS", "FAIL")) for line in lines[:4])
    for transport in ("websocket", "webrtc"):
        assert transport in out  # the table covers both transports
