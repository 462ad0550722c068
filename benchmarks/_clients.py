"""Benchmark clients: one per transport, same interface, timestamps on arrival."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import numpy as np
import websockets

CHUNK_MS = 40  # audio per append: what a real-time client sends at a time
SOUND_RMS = 0.01  # a received audio frame louder than this (-40 dBFS) is speech, not silence
# The benchmarks' audio is 16 kHz PCM16: declared in each conversation's session.update
# (a session that declares nothing takes OpenAI's 24 kHz).
PCM16K = {"type": "audio/pcm", "rate": 16000}


def with_16k_input(session: dict[str, Any]) -> dict[str, Any]:
    """A session.update's `session` with audio.input.format set to 16 kHz PCM."""
    audio = dict(session.get("audio") or {})
    audio["input"] = {**(audio.get("input") or {}), "format": PCM16K}
    return {**session, "audio": audio}


DECLARE_16K = json.dumps({"type": "session.update", "session": with_16k_input({})})


def appends(audio: np.ndarray, chunk_ms: int = CHUNK_MS) -> list[str]:
    """16 kHz float audio -> `input_audio_buffer.append` events of `chunk_ms` each."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    step = 16 * chunk_ms
    return [
        json.dumps(
            {
                "type": "input_audio_buffer.append",
                "audio": base64.b64encode(pcm[i : i + step].tobytes()).decode(),
            }
        )
        for i in range(0, pcm.size, step)
    ]


class WebSocketClient:
    name = "websocket"

    async def connect(self, base_url: str) -> None:
        url = base_url.replace("http", "ws", 1) + "/v1/realtime"
        self.ws = await websockets.connect(url, max_size=16 * 1024 * 1024)

    async def send(self, text: str) -> None:
        await self.ws.send(text)

    async def recv(self) -> tuple[float, dict[str, Any]]:
        text = await self.ws.recv()
        return time.perf_counter(), json.loads(text)

    async def close(self) -> None:
        await self.ws.close()


class WebRTCClient:
    """aiortc peer with the `oai-events` data channel: events both ways. No microphone
    track; with `listen`, it receives the server's speech track and timestamps every frame's
    loudness in `frames` (arrival time, RMS of 48 kHz PCM16 scaled to 0..1)."""

    name = "webrtc"

    def __init__(self, listen: bool = False, microphone: Any = None) -> None:
        self.listen = listen
        self.microphone = microphone  # an aiortc audio track to send (None: no track)
        self.frames: list[tuple[float, float]] = []
        self.sound = asyncio.Event()  # a frame louder than silence arrived
        self._reader: asyncio.Task[None] | None = None

    async def connect(self, base_url: str) -> None:
        import httpx
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("oai-events")
        self.inbox: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
        self.channel.on("message", lambda m: self.inbox.put_nowait((time.perf_counter(), m)))
        if self.microphone is not None:
            self.pc.addTrack(self.microphone)
        if self.listen:
            self.pc.addTransceiver("audio", direction="recvonly")
            self.pc.on("track", self._on_track)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with httpx.AsyncClient() as http:
            reply = await http.post(
                f"{base_url}/v1/realtime/calls",
                content=self.pc.localDescription.sdp,
                headers={"content-type": "application/sdp"},
            )
        if reply.status_code != 201:
            await self.pc.close()
            raise RuntimeError(f"offer refused: {reply.status_code} {reply.text}")
        await self.pc.setRemoteDescription(RTCSessionDescription(reply.text, "answer"))

    async def send(self, text: str) -> None:
        self.channel.send(text)

    async def recv(self) -> tuple[float, dict[str, Any]]:
        at, text = await self.inbox.get()
        return at, json.loads(text)

    def _on_track(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        async def read() -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                pcm = frame.to_ndarray().astype(np.float32) / 32768
                level = float(np.sqrt(np.mean(pcm**2)))
                self.frames.append((time.perf_counter(), level))
                if level > SOUND_RMS:
                    self.sound.set()

        self._reader = asyncio.create_task(read())

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
