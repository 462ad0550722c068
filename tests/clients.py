"""Clients the tests drive the server with, shared by several test files: the command line
as a process, a WebRTC peer standing in for the browser, push-to-talk over the WebSocket,
and a collector of the per-turn TTFT log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from conftest import REPO, SAMPLE_WAV
from patience import scaled
from wire import PUSH_TO_TALK, append_event

from voxtral_server.api.metrics import TTFT_LOGGER, TurnRecord, parse_line
from voxtral_server.models.audio import read_audio_file

SPEECH = read_audio_file(SAMPLE_WAV)  # 0.3 s silence, speech to 2.7 s, then silence


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`voxtral-server ARGS` as an operator runs it (offline), waited for to the end."""
    return subprocess.run(
        [sys.executable, "-m", "voxtral_server.cli", *args],
        capture_output=True,
        text=True,
        timeout=scaled(300, 1200),  # a bound on a hung command, never a pass/fail threshold
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


class Client:
    """A browser stand-in: microphone from a wav file, events on `oai-events`."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("oai-events")
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.channel.on("message", self._on_message)
        self.player: MediaPlayer | None = None

    def _on_message(self, message: str) -> None:
        self.events.append(json.loads(message))
        self.changed.set()

    async def connect(self, base_url: str, wav: str | None = str(SAMPLE_WAV)) -> None:
        if wav is not None:
            self.player = MediaPlayer(wav)
            self.pc.addTrack(self.player.audio)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with httpx.AsyncClient() as http:
            reply = await http.post(
                f"{base_url}/v1/realtime/calls",
                content=self.pc.localDescription.sdp,
                headers={"content-type": "application/sdp"},
            )
        assert reply.status_code == 201, reply.text
        assert reply.headers["content-type"].startswith("application/sdp")
        await self.pc.setRemoteDescription(RTCSessionDescription(reply.text, "answer"))

    async def wait_for(self, type_: str, within_s: float = 60) -> dict[str, Any]:
        async def until() -> dict[str, Any]:
            while True:
                for event in self.events:
                    if event["type"] == type_:
                        return event
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(until(), within_s)

    def send(self, event: dict[str, Any]) -> None:
        self.channel.send(json.dumps(event))

    async def close(self) -> None:
        if self.player is not None and self.player.audio is not None:
            self.player.audio.stop()
        await self.pc.close()


def ptt_events() -> list[str]:
    """One push-to-talk turn on the sample clip, as client events (JSON text)."""
    return [
        PUSH_TO_TALK,
        append_event(SPEECH),
        json.dumps({"type": "input_audio_buffer.commit"}),
        json.dumps({"type": "response.create"}),
    ]


async def ws_until(ws: Any, type_: str) -> dict[str, Any]:
    """The next server event of `type_` on a WebSocket (the ones before it are dropped)."""
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if event["type"] == type_:
            return event


class TtftLines(logging.Handler):
    """Collects the TTFT log lines as they are written, and waits for them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.arrived = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.arrived:
            self.lines.append(record.getMessage())
            self.arrived.notify_all()

    def wait_for(self, session_count: int, within_s: float = 30) -> list[TurnRecord]:
        with self.arrived:
            arrived = self.arrived.wait_for(lambda: len(self.lines) >= session_count, within_s)
            assert arrived, f"{len(self.lines)} TTFT lines in {within_s:g} s, {session_count} due"
        records = [parse_line(line) for line in self.lines]
        assert all(r is not None for r in records)
        return records  # type: ignore[return-value]


@contextmanager
def ttft_lines() -> Iterator[TtftLines]:
    """The TTFT lines written meanwhile. The TTFT logger's level and handlers are put back
    afterwards: a test must not leave logging configured for the tests that run after it."""
    handler = TtftLines()
    log = logging.getLogger(TTFT_LOGGER)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
