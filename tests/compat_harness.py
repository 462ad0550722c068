"""Running a stock client program (tests/compat/) against the server and reading what it
saw: the environment it needs (tests/client_envs.py), the speech it sends (the sample clip
at 24 kHz, OpenAI's only PCM rate), and its JSON lines."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from client_envs import ClientUnavailable, NodeClients, PythonClient
from clients import SPEECH
from conftest import REPO
from patience import scaled

from voxtral_server.models.audio import SAMPLE_RATE

PROGRAMS = REPO / "tests" / "compat"
CLIENT_RATE = 24_000


def words(text: str | None) -> str:
    """Text as a reader compares it: whitespace runs made one space, ends trimmed."""
    return re.sub(r"\s+", " ", text or "").strip()


def write_speech_24k(path: Path) -> Path:
    """The sample clip (speech from 0.3 s to 2.7 s) as raw PCM16 mono at 24 kHz."""
    audio = soxr.resample(SPEECH, SAMPLE_RATE, CLIENT_RATE)
    path.write_bytes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def require(env: PythonClient | NodeClients) -> Path:
    """The client's python (or node folder); skips the test if it cannot be built for lack
    of a network to the package index, fails it for any other reason."""
    try:
        return env.ensure()
    except ClientUnavailable as exc:
        if exc.offline:
            pytest.skip(str(exc))
        pytest.fail(str(exc))


@dataclass
class ClientRun:
    """What one client program printed (its JSON lines) and logged (stderr)."""

    lines: list[dict[str, Any]]
    stderr: str
    returncode: int

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["kind"] == kind]

    def turn(self, what: str) -> dict[str, Any]:
        turns = [t for t in self.of("turn") if t["what"] == what]
        assert len(turns) == 1, f"no {what} turn finished\n{self.describe()}"
        return turns[0]

    def problems(self) -> list[str]:
        """What its user would see go wrong: a crash, an error the client reported, an
        error the client library logged (a dropped or invalid event)."""
        return [
            json.dumps(line)[:2000]
            for line in self.lines
            if line["kind"] in ("crash", "error", "pipeline_error")
            or (line["kind"] == "log" and line["level"] in ("ERROR", "CRITICAL"))
        ]

    def server_event_types(self) -> list[str]:
        return [line["type"] for line in self.of("server_event")]

    def describe(self) -> str:
        """For assertion messages: the problems, the turns, the end of stderr."""
        interesting = [
            json.dumps(line)[:600]
            for line in self.lines
            if line["kind"] not in ("server_event", "log")
        ]
        tail = "\n".join(self.stderr.splitlines()[-25:])
        return (
            f"exit {self.returncode}; problems:\n  "
            + "\n  ".join(self.problems() or ["(none)"])
            + "\nlines:\n  "
            + "\n  ".join(interesting)
            + f"\nstderr tail:\n{tail}"
        )


def run_program(
    argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> ClientRun:
    """Run a client program to its end. Its own deadline (scaled by the machine's load)
    bounds how long it waits for the server; this bound only catches a program that hangs
    past it."""
    deadline = scaled(60, 300)
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "VOXTRAL_CLIENT_DEADLINE_S": f"{deadline:.0f}", **(env or {})},
        timeout=deadline + 120,
        check=False,
    )
    lines = []
    for raw in result.stdout.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:  # a library printing to stdout
            lines.append({"kind": "stdout", "text": raw})
    run = ClientRun(lines, result.stderr, result.returncode)
    assert run.lines and run.lines[-1]["kind"] == "end", f"no end line\n{run.describe()}"
    return run


def run_python_client(python: Path, program: str, *args: str) -> ClientRun:
    return run_program([str(python), str(PROGRAMS / program), *args])


def run_node_client(folder: Path, program: str, *args: str, env: dict[str, str]) -> ClientRun:
    """Node resolves a script's imports from the script's own folder upwards, so the program
    (with its helper) is copied into a fresh folder inside the one holding node_modules."""
    node = shutil.which("node")
    assert node is not None
    with tempfile.TemporaryDirectory(dir=folder, prefix="run-") as run_dir:
        for name in (program, "_report.mjs"):
            shutil.copy(PROGRAMS / name, run_dir)
        return run_program([node, str(Path(run_dir) / program), *args], env=env)
