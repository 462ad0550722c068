"""Speech out against the real server: espeak-ng audio on the WebSocket and the WebRTC track,
matching the words shown, and barge-in cutting it short."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import websockets
from aiortc.mediastreams import MediaStreamError
from clients import Client
from conftest import SAMPLE_WAV, SCRIPT
from servers import idle, on_server, running_server

from voxtral_server.config import Settings
from voxtral_server.models.audio import PcmResampler, read_audio_file
from voxtral_server.models.tts import TtsEngine, load_tts
from voxtral_server.models.voxtral import VoxtralEngine

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="install the Debian package espeak-ng"
)

SPEECH = read_audio_file(SAMPLE_WAV)  # 0.3 s silence, speech to 2.7 s, then silence
SETTINGS = Settings().with_overrides({("tts", "engine"): "espeak"})
WS_RATE = SETTINGS.tts.sample_rate
ENVELOPE_MS = 20


def appends(audio: np.ndarray, chunk_ms: int = 40) -> Iterator[str]:
    step = 16 * chunk_ms
    for i in range(0, audio.size, step):
        pcm = (np.clip(audio[i : i + step], -1, 1) * 32767).astype("<i2").tobytes()
        yield json.dumps(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}
        )


@pytest.fixture(scope="module")
def server(scripted_engine: VoxtralEngine) -> Iterator[tuple[str, Any]]:
    with running_server(SETTINGS, scripted_engine) as running:
        yield running


@pytest.fixture(scope="module")
def espeak() -> Iterator[TtsEngine]:
    tts = load_tts(SETTINGS)
    assert tts is not None
    yield tts
    tts.close()


def render(tts: TtsEngine, phrases: list[str], rate: int) -> np.ndarray:
    """What the server should have said: each phrase through the same engine, in order."""
    resampler = PcmResampler(tts.sample_rate, rate)
    parts = [resampler.feed(chunk) for ph in phrases for chunk in tts.stream(ph.strip())]
    return np.concatenate([*parts, resampler.flush()]).astype(np.float32) / 32768


def envelope(audio: np.ndarray, rate: int) -> np.ndarray:
    n = rate * ENVELOPE_MS // 1000
    frames = audio[: audio.size // n * n].reshape(-1, n)
    return np.sqrt((frames**2).mean(axis=1))


def similarity(heard: np.ndarray, expected: np.ndarray, rate: int) -> float:
    """Pearson correlation of the loudness envelopes, at the best alignment of the two."""
    a, b = envelope(heard, rate), envelope(expected, rate)
    a = np.pad(a, (0, max(b.size - a.size, 0)))
    best = -1.0
    for lag in range(a.size - b.size + 1):
        window = a[lag : lag + b.size]
        if window.std() > 0:
            best = max(best, float(np.corrcoef(window, b)[0, 1]))
    return best


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if audio.size else 0.0


async def ws_turn(
    url: str, barge_in: bool = False
) -> tuple[list[tuple[float, dict[str, Any]]], float | None]:
    """One hands-free turn; with `barge_in`, speech is sent once the answer is heard.
    Returns every event with its arrival time, and when the barge-in speech was sent."""
    events: list[tuple[float, dict[str, Any]]] = []
    injected_at = None
    async with websockets.connect(url) as ws:
        for message in appends(SPEECH):
            await ws.send(message)
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 60))
            events.append((time.perf_counter(), event))
            if event["type"] == "response.output_audio.delta" and barge_in and not injected_at:
                injected_at = time.perf_counter()
                for message in appends(SPEECH[int(0.3 * 16000) :]):  # straight into speech
                    await ws.send(message)
            if event["type"] == "response.done":
                return events, injected_at


def of(events: list[tuple[float, dict[str, Any]]], type_: str) -> list[dict[str, Any]]:
    return [e for _, e in events if e["type"] == type_]


def decode(deltas: list[dict[str, Any]]) -> np.ndarray:
    pcm = b"".join(base64.b64decode(d["delta"]) for d in deltas)
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768


@pytest.mark.asyncio
async def test_websocket_audio_is_the_answer_spoken(
    server: tuple[str, Any], espeak: TtsEngine
) -> None:
    base_url, _app = server
    events, _ = await ws_turn(base_url.replace("http", "ws") + "/v1/realtime")
    done = of(events, "response.done")[0]
    assert done["response"]["status"] == "completed"
    shown = "".join(e["delta"] for e in of(events, "response.output_text.delta"))
    phrases = [e["delta"] for e in of(events, "response.output_audio_transcript.delta")]
    assert shown == SCRIPT and "".join(phrases) == SCRIPT  # every word spoken is shown, in order
    assert len(phrases) > 1  # spoken phrase by phrase, not at the end
    assert of(events, "response.output_audio_transcript.done")[0]["transcript"] == SCRIPT
    assert len(of(events, "response.output_audio.done")) == 1
    heard = decode(of(events, "response.output_audio.delta"))
    expected = render(espeak, phrases, WS_RATE)
    assert heard.size == pytest.approx(expected.size, rel=0.02)
    assert rms(heard) > 0.01  # speech, far above silence (-40 dBFS)
    assert similarity(heard, expected, WS_RATE) > 0.95
    t = done["timings"]
    assert t["ttfa_ms"] is not None and t["ttfa_ms"] >= t["first_word_ms"] > 0


class ListeningClient(Client):
    """The browser stand-in that also hears the server's speech track: every
    frame's arrival time and 48 kHz mono samples in `frames`. Without `mic`, audio goes as
    appends on the channel and the offer only receives audio."""

    def __init__(self, mic: bool = True) -> None:
        super().__init__()
        self.mic = mic
        self.frames: list[tuple[float, np.ndarray]] = []
        self.sound = asyncio.Event()  # a frame louder than silence arrived
        self.reader: asyncio.Task[None] | None = None
        self.pc.on("track", self._on_track)

    def _on_track(self, track: Any) -> None:
        async def read() -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
                self.frames.append((time.perf_counter(), pcm.astype(np.float32) / 32768))
                if rms(self.frames[-1][1]) > 0.01:
                    self.sound.set()
                self.changed.set()

        self.reader = asyncio.create_task(read())

    async def connect(self, base_url: str, wav: str | None = str(SAMPLE_WAV)) -> None:
        if not self.mic:
            self.pc.addTransceiver("audio", direction="recvonly")
        await super().connect(base_url, wav if self.mic else None)

    async def close(self) -> None:
        await super().close()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


@pytest.mark.asyncio
async def test_webrtc_track_carries_the_answer_spoken(
    server: tuple[str, Any], espeak: TtsEngine
) -> None:
    base_url, _app = server
    client = ListeningClient()
    try:
        await client.connect(base_url)
        done = await client.wait_for("response.done")
        # The track goes on with silence after the answer: keep listening a moment longer
        # than the jitter buffer holds, so the answer's tail has arrived.
        ended = len(client.frames)
        while len(client.frames) < ended + 20:  # 400 ms of track
            client.changed.clear()
            await asyncio.wait_for(client.changed.wait(), 10)
    finally:
        await client.close()
    assert done["response"]["status"] == "completed"
    shown = "".join(e["delta"] for e in client.events if e["type"].endswith("text.delta"))
    phrases = [e["delta"] for e in client.events if e["type"].endswith("transcript.delta")]
    assert shown == SCRIPT and "".join(phrases) == SCRIPT
    heard = np.concatenate([pcm for _, pcm in client.frames])
    expected = render(espeak, phrases, 48_000)
    loud = envelope(heard, 48_000) > 0.01
    assert loud.sum() * ENVELOPE_MS / 1000 > 0.5 * expected.size / 48_000  # speech, not silence
    assert similarity(heard, expected, 48_000) > 0.8  # Opus-coded, so less than exact
    assert done["timings"]["ttfa_ms"] >= done["timings"]["first_word_ms"] > 0


@pytest.mark.asyncio
async def test_barge_in_stops_the_audio_within_100_ms(server: tuple[str, Any]) -> None:
    base_url, _app = server
    events, injected_at = await ws_turn(base_url.replace("http", "ws") + "/v1/realtime", True)
    assert injected_at is not None
    done = of(events, "response.done")[0]
    assert done["response"]["status"] == "cancelled"
    audio_times = [t for t, e in events if e["type"] == "response.output_audio.delta"]
    stopped_ms = (max(audio_times) - injected_at) * 1000
    assert stopped_ms <= 100, f"audio went on for {stopped_ms:.0f} ms after the user spoke"
    # Less was sent than the whole answer: the rest was dropped at the server.
    phrases = [e["delta"] for e in of(events, "response.output_audio_transcript.delta")]
    assert "".join(phrases) != SCRIPT


@pytest.mark.asyncio
async def test_the_webrtc_track_is_silent_from_the_frame_after_a_barge_in() -> None:
    from voxtral_server.api.transports.audio_track import FRAME_SAMPLES, SpeechTrack

    track = SpeechTrack()
    started: list[int] = []
    track.write(np.full(10 * FRAME_SAMPLES, 8000, np.int16), ("r", "i"), lambda: started.append(1))
    try:
        first = (await track.recv()).to_ndarray()
        assert started == [1] and first.size == FRAME_SAMPLES and (first == 8000).all()
        track.clear()  # barge-in: the 9 frames still queued are dropped
        await asyncio.wait_for(track.drained(), 1)
        for _ in range(3):
            assert not (await track.recv()).to_ndarray().any()  # silence, as between answers
    finally:
        track.stop()


@pytest.mark.asyncio
async def test_disconnect_while_speaking_leaves_nothing_running(
    server: tuple[str, Any],
) -> None:
    base_url, app = server
    baseline = on_server(app, idle(app))
    async with websockets.connect(base_url.replace("http", "ws") + "/v1/realtime") as ws:
        for message in appends(SPEECH):
            await ws.send(message)
        while json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] != (
            "response.output_audio.delta"
        ):
            pass
    # The session closed mid-answer: its speech, audio pump and finishing task all ended.
    assert on_server(app, idle(app)) == baseline
    events, _ = await ws_turn(base_url.replace("http", "ws") + "/v1/realtime")  # next one works
    assert of(events, "response.done")[0]["response"]["status"] == "completed"


@pytest.mark.asyncio
async def test_webrtc_barge_in_stops_the_track_within_100_ms(server: tuple[str, Any]) -> None:
    base_url, app = server
    client = ListeningClient(mic=False)
    try:
        await client.connect(base_url)
        await client.wait_for("session.created")
        for message in appends(SPEECH):
            client.channel.send(message)
        await asyncio.wait_for(client.sound.wait(), 30)  # the answer is heard
        sent_before = len(client.events)
        injected_at = time.perf_counter()
        # The user talks over it (no pause after, so no new turn starts meanwhile).
        for message in appends(SPEECH[int(0.3 * 16000) : int(2.7 * 16000)]):
            client.channel.send(message)
        done = await client.wait_for("response.done")
        (call,) = app.state.server.peers.calls
        track = call.speech_track
        # Hear the track a little longer: nothing loud may come after the barge-in's frames.
        ended = len(client.frames)
        while len(client.frames) < ended + 10:
            client.changed.clear()
            await asyncio.wait_for(client.changed.wait(), 10)
    finally:
        await client.close()
    assert done["response"]["status"] == "cancelled"
    assert any(
        e["type"] == "input_audio_buffer.speech_started" for e in client.events[sent_before:]
    )
    stopped_ms = (track.last_speech_at - injected_at) * 1000
    assert stopped_ms <= 100, f"speech frames went on for {stopped_ms:.0f} ms"
    # On the client: the last speech arrives within 100 ms of the barge-in plus the lag of
    # this call's audio path (Opus, jitter buffer), measured on its first speech frame.
    loud = [at for at, pcm in client.frames if rms(pcm) > 0.01]
    assert loud and track.first_speech_at is not None
    lag = loud[0] - track.first_speech_at
    heard_ms = (loud[-1] - injected_at - lag) * 1000
    assert heard_ms <= 100 + 20, f"the client heard speech {heard_ms:.0f} ms after barge-in"
