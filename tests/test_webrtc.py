"""WebRTC against the real server with a real aiortc peer: track audio, channel events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from conftest import SAMPLE_WAV, SCRIPT
from servers import running_server

from voxtral_server.config import Settings
from voxtral_server.models.voxtral import VoxtralEngine


@pytest.fixture(scope="module")
def server(scripted_engine: VoxtralEngine) -> Iterator[tuple[str, Any]]:
    with running_server(Settings(), scripted_engine) as running:
        yield running


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


@pytest.mark.asyncio
async def test_words_arrive_on_the_data_channel(server: tuple[str, Any]) -> None:
    base_url, _app = server
    client = Client()
    try:
        await client.connect(base_url)
        await client.wait_for("session.created")
        done = await client.wait_for("response.done")
    finally:
        await client.close()
    words = [e["delta"] for e in client.events if e["type"] == "response.output_text.delta"]
    assert "".join(words) == SCRIPT
    assert [w.strip() for w in words] == SCRIPT.split()
    assert done["response"]["status"] == "completed"
    assert done["timings"]["transport"] == "webrtc"
    types = [e["type"] for e in client.events]
    assert types.index("input_audio_buffer.speech_started") < types.index("response.created")
