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
    """aiortc peer with only the `oai-events` data channel: events both ways, no track."""

    name = "webrtc"

    async def connect(self, base_url: str) -> None:
        import httpx
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("oai-events")
        self.inbox: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
        self.channel.on("message", lambda m: self.inbox.put_nowait((time.perf_counter(), m)))
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

    async def close(self) -> None:
        await self.pc.close()
