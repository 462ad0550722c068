"""webrtc.jitter_*: the setting reaches aiortc's receiver, and calls through an impaired
network (the benchmark's UDP relay) still work. Relations measured in one run, no clocks."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from conftest import REPO
from servers import running_server

from voxtral_server.api.transports import webrtc
from voxtral_server.config import Settings
from voxtral_server.models.audio import SAMPLE_RATE
from voxtral_server.models.voxtral import VoxtralEngine

BENCHMARKS = REPO / "benchmarks"


sys.path.insert(0, str(BENCHMARKS))  # the benchmark and its relay, imported as it runs
try:
    import jitter
finally:
    sys.path.remove(str(BENCHMARKS))


class Call:
    """An aiortc client whose microphone is the benchmark's paced clip, through a relay."""

    def __init__(self, impairment: Any) -> None:
        self.mic = jitter.Microphone(jitter.read_audio_file(jitter.CLIP))
        self.relay = jitter.Relay(impairment, warmup_packets=10)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        channel = self.pc.createDataChannel("oai-events")
        channel.on("message", self._on_message)
        self.pc.addTrack(self.mic.track)

    def _on_message(self, message: str) -> None:
        self.events.append(json.loads(message))
        self.changed.set()

    async def connect(self, base_url: str) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription.sdp
        await self.relay.start(self.relay.host_of(offer))
        async with httpx.AsyncClient() as http:
            reply = await http.post(
                f"{base_url}/v1/realtime/calls",
                content=self.relay.offer_for_server(offer),
                headers={"content-type": "application/sdp"},
            )
        assert reply.status_code == 201, reply.text
        answer = self.relay.answer_for_client(reply.text)
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    async def wait_for(self, type_: str, within_s: float = 60) -> dict[str, Any]:
        async def until() -> dict[str, Any]:
            while True:
                for event in self.events:
                    if event["type"] == type_:
                        return event
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(until(), within_s)

    async def close(self) -> None:
        await self.pc.close()
        self.relay.close()


class Heard:
    """(perf_counter, RTP timestamp, samples) of every piece of audio a call hands its
    session, on any server of this process; `wait(n)` until n pieces have come."""

    def __init__(self) -> None:
        self.pieces: list[tuple[float, int, int]] = []
        self._more = threading.Condition()

    def add(self, timestamp: int, samples: int) -> None:
        with self._more:
            self.pieces.append((time.perf_counter(), timestamp, samples))
            self._more.notify_all()

    def wait(self, count: int, within_s: float = 60) -> bool:
        with self._more:
            return self._more.wait_for(lambda: len(self.pieces) >= count, within_s)


@pytest.fixture
def heard(monkeypatch: pytest.MonkeyPatch) -> Heard:
    recorder = Heard()
    hear = webrtc.Call.hear

    def recording(call: webrtc.Call, pcm: np.ndarray, timestamp: int) -> None:
        recorder.add(timestamp, pcm.size)
        hear(call, pcm, timestamp)

    monkeypatch.setattr(webrtc.Call, "hear", recording)
    return recorder


@pytest.mark.asyncio
async def test_a_turn_completes_through_loss_reordering_and_jitter(
    scripted_engine: VoxtralEngine, heard: Heard
) -> None:
    impairment = jitter.Impairment("rough", loss=0.05, reorder=0.1, jitter_ms=30)
    with running_server(Settings(), scripted_engine) as (base_url, _app):
        call = Call(impairment)
        try:
            await call.connect(base_url)
            done = await call.wait_for("response.done")
        finally:
            await call.close()
    assert done["response"]["status"] == "completed"
    assert call.relay.dropped > 0 and call.relay.reordered > 0  # the network was impaired


FRAMES = 150  # three seconds of audio
REORDERED = jitter.Impairment("reordered", reorder=0.1, reorder_ms=30)


async def _frames_heard(window: int, engine: VoxtralEngine, heard: Heard) -> list[int]:
    """The frame numbers (from RTP timestamps) the session got as themselves, in the order
    it got them, through a relay that holds 10% of the packets back 30 ms."""
    settings = Settings().with_overrides({("webrtc", "jitter_window"): window})
    with running_server(settings, engine) as (base_url, _app):
        call = Call(REORDERED)
        heard.pieces.clear()
        try:
            await call.connect(base_url)
            assert await asyncio.to_thread(heard.wait, FRAMES), "the audio did not arrive"
        finally:
            await call.close()
    assert call.relay.reordered > 0
    ticks = SAMPLE_RATE // 50 * jitter.TICKS_PER_SAMPLE  # RTP ticks per 20 ms frame
    pieces = heard.pieces[:FRAMES]
    # A concealment piece comes just before the frame whose timestamp it carries.
    return [
        timestamp // ticks
        for i, (_, timestamp, _) in enumerate(pieces)
        if i + 1 == len(pieces) or pieces[i + 1][1] != timestamp
    ]


@pytest.mark.asyncio
async def test_the_window_lets_reordered_packets_count(
    scripted_engine: VoxtralEngine, heard: Heard
) -> None:
    """With no window a packet overtaken by the next one is given up (concealed); with a
    window of 2 it is waited for. Either way the session hears frames in order."""
    eager = await _frames_heard(0, scripted_engine, heard)
    patient = await _frames_heard(2, scripted_engine, heard)
    for frames in (eager, patient):
        assert frames == sorted(set(frames))
    missing = [frames[-1] + 1 - len(frames) for frames in (eager, patient)]
    print(f"frames missing of {FRAMES}: window 0 {missing[0]}, window 2 {missing[1]}")
    assert missing[0] > missing[1]
