"""The page in Chromium: end of speech -> first word seen, and -> first audio heard.

    python benchmarks/browser.py [--turns N] [--mode server_vad|semantic_vad:EAGERNESS ...]
                                 [--tts espeak|none] [--clip WAV] [--websocket]

Starts the real app in this process (a tiny scripted checkpoint, speech out through espeak-ng
when installed), opens the page in headless Debian Chromium whose fake microphone plays
--clip followed by 3 s of silence, in a loop, connects (WebRTC, or the WebSocket with
--websocket), and lets the conversation run hands-free for --turns answered turns per mode.
Each turn's figures are the page's own (`client_first_word_ms`, `client_first_audio_ms`: from
the end of speech, placed by the page at the `speech_stopped` event's arrival minus the
silence the server heard, to the first word on screen and to the first sound from its
playback analyser), read from the server's TTFT lines. Prints p50/p95 per mode, writes
benchmarks/out/browser.json. The first turn of each mode is a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from _common import machine, pct, table, write_json

from voxtral_server.api.app import create_app
from voxtral_server.api.inprocess import InProcessServer
from voxtral_server.api.metrics import TTFT_LOGGER, TurnRecord, parse_line
from voxtral_server.config import load_settings
from voxtral_server.models.audio import SAMPLE_RATE, read_audio_file

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ANSWER = "Hello world, the quick brown fox jumps over the lazy dog."
GAP_S = 3.0  # silence after each utterance in the microphone's loop


class Lines(logging.Handler):
    """TTFT records as the server writes them (after the page's report, or its wait)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[TurnRecord] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        parsed = parse_line(record.getMessage())
        if parsed is not None:
            with self.changed:
                self.records.append(parsed)
                self.changed.notify_all()

    def wait_for(self, count: int, timeout_s: float) -> list[TurnRecord]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.records) >= count, timeout_s)
            return list(self.records)


@contextlib.contextmanager
def ttft_lines() -> Iterator[Lines]:
    handler = Lines()
    log = logging.getLogger(TTFT_LOGGER)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def microphone_file(clip: Path, folder: Path) -> Path:
    audio = read_audio_file(clip)
    looped = np.concatenate([audio, np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)])
    path = folder / "microphone.wav"
    sf.write(path, looped, SAMPLE_RATE, subtype="PCM_16")
    return path


def mode_overrides(mode: str) -> dict[tuple[str, ...], Any]:
    kind, _, eagerness = mode.partition(":")
    if kind not in ("server_vad", "semantic_vad"):
        raise SystemExit(f"--mode: server_vad or semantic_vad:EAGERNESS, not {mode!r}")
    out: dict[tuple[str, ...], Any] = {("vad", "type"): kind}
    if eagerness:
        out[("vad", "eagerness")] = eagerness
    return out


def run_mode(
    playwright: Any, url: str, mic: Path, turns: int, websocket: bool, lines: Lines
) -> list[TurnRecord]:
    profile = tempfile.mkdtemp(prefix="voxtral-bench-chromium-")
    context = playwright.chromium.launch_persistent_context(
        profile,
        executable_path=CHROMIUM,
        headless=True,
        args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--autoplay-policy=no-user-gesture-required",
        ],
    )
    try:
        page = context.pages[0] if context.pages else context.new_page()
        start = len(lines.records)
        page.goto(url)
        page.click("#connect")
        wanted = "WebSocket" if websocket else "WebRTC"
        page.wait_for_function(
            f"document.getElementById('badge').textContent.startsWith('{wanted}')",
            timeout=60_000,
        )
        per_turn_s = 3 * (read_audio_file(mic).size / SAMPLE_RATE) + 30
        records = lines.wait_for(start + turns + 1, per_turn_s * (turns + 1))
        return records[start + 1 : start + turns + 1]  # the first turn warms up
    finally:
        context.close()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--turns", type=int, default=10, help="measured turns per mode")
    parser.add_argument(
        "--mode",
        action="append",
        help="server_vad, or semantic_vad:low|medium|high|auto (repeatable; default: config)",
    )
    parser.add_argument("--tts", default="espeak", choices=["espeak", "none"])
    parser.add_argument("--clip", type=Path, default=REPO / "static" / "sample.wav")
    parser.add_argument("--websocket", action="store_true", help="WebRTC disabled on the server")
    parser.add_argument("--name", default="browser", help="stem of the JSON in out/")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"Chromium is not installed ({CHROMIUM}): apt-get install chromium", file=sys.stderr)
        return 1
    tts = args.tts if args.tts == "none" or shutil.which("espeak-ng") else "none"
    from playwright.sync_api import sync_playwright

    from voxtral_server.models.tiny import build_tiny

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="browser-bench-") as tmp, ttft_lines() as lines:
        folder = Path(tmp)
        model = str(build_tiny(folder / "tiny", script=ANSWER))
        mic = microphone_file(args.clip, folder)
        with sync_playwright() as playwright:
            for mode in args.mode or ["config"]:
                overrides: dict[tuple[str, ...], Any] = {
                    ("model", "id"): model,
                    ("tts", "engine"): tts,
                }
                if mode != "config":
                    overrides.update(mode_overrides(mode))
                if args.websocket:
                    overrides[("webrtc", "enabled")] = False
                settings = load_settings(None, overrides)
                server = InProcessServer(create_app(settings)).start()
                try:
                    records = run_mode(
                        playwright, server.base_url, mic, args.turns, args.websocket, lines
                    )
                finally:
                    server.stop()
                words = [r.client_first_word_ms for r in records if r.client_first_word_ms]
                audio = [r.client_first_audio_ms for r in records if r.client_first_audio_ms]
                results[mode] = {
                    "turns": len(records),
                    "first_word_p50_ms": pct(words, 50),
                    "first_word_p95_ms": pct(words, 95),
                    "first_audio_p50_ms": pct(audio, 50),
                    "first_audio_p95_ms": pct(audio, 95),
                    "end_of_turn": [r.end_of_turn for r in records],
                    "records": [r.__dict__ for r in records],
                }
    print(f"machine: {machine()}")
    print(f"clip: {args.clip.name}; transport: {'websocket' if args.websocket else 'webrtc'}")
    heads = ["mode", "turns", "1st word p50", "p95", "1st audio p50", "p95"]
    rows = [
        [
            mode,
            r["turns"],
            r["first_word_p50_ms"],
            r["first_word_p95_ms"],
            r["first_audio_p50_ms"],
            r["first_audio_p95_ms"],
        ]
        for mode, r in results.items()
    ]
    print(table(heads, rows))
    path = write_json(args.name, {"clip": str(args.clip), "tts": tts, "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
