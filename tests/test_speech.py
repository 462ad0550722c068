"""Speech out against the real server: espeak-ng audio on the WebSocket and the WebRTC track,
matching the words shown, and barge-in cutting it short."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import websockets
from aiortc.mediastreams import MediaStreamError
from clients import Client
from conftest import SAMPLE_WAV, SCRIPT
from servers import idle, on_server, running_server
from wire import DECLARE_16K, appends

from voxtral_server.config import Settings
from voxtral_server.models.audio import PcmResampler, read_audio_file
from voxtral_server.models.tts import TtsEngine, load_tts
from voxtral_server.models.voxtral import VoxtralEngine

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="install the Debian package espeak-ng"
)

SPEECH = read_audio_file(SAMPLE_WAV)  # 0.3 s silence, speech to 2.7 s, then silence
SETTINGS = Settings().with_overrides({("tts", "engine"): "espeak"})
WS_RATE = 24000  # audio/pcm, the output format of a session that declares none
ENVELOPE_MS = 20


@pytest.fixture(scope="module")
def server(scripted_engine: VoxtralEngine) -> Iterator[tuple[str, Any]]:
    with running_server(SETTINGS, scripted_engine) as running:
        yield running


@pytest.fixture(scope="module")
def one_phrase_server(scripted_engine: VoxtralEngine) -> Iterator[tuple[str, Any]]:
    """The whole answer is one phrase: when its first audio goes out, seconds of it wait in
    the server's queue, so speech that a barge-in failed to drop would still go out."""
    settings = SETTINGS.with_overrides(
        {("tts", "first_phrase_min_words"): 64, ("tts", "phrase_timeout_ms"): 10_000}
    )
    with running_server(settings, scripted_engine) as running:
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


async def ws_turn(url: str, barge_in: bool = False) -> list[dict[str, Any]]:
    """One hands-free turn, every event in the order the server sent it, to its response.done.

    With `barge_in`, the user talks over the answer once its audio arrives, then pauses: that
    speech is the next turn, and the events go on until that answer's first audio, so that
    anything the interrupted answer still sent after its response.done is seen."""
    events: list[dict[str, Any]] = []
    first: str | None = None  # the id of the turn's response
    async with websockets.connect(url) as ws:
        await ws.send(DECLARE_16K)
        await ws.send(SPOKEN_EVENTS)
        for message in appends(SPEECH):
            await ws.send(message)
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 60))
            events.append(event)
            if event["type"] == "response.output_audio.delta" and barge_in:
                if first is None:
                    first = event["response_id"]
                    for message in appends(SPEECH[int(0.3 * 16000) :]):  # straight into speech
                        await ws.send(message)
                elif event["response_id"] != first:
                    return events  # the next turn is being spoken
            if event["type"] == "response.done" and not barge_in:
                return events


# Extension: the server tells which phrase starts to sound (voxtral.output_audio.spoken).
SPOKEN_EVENTS = json.dumps(
    {"type": "session.update", "session": {"voxtral": {"spoken_events": True}}}
)


def of(events: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_]


def decode(deltas: list[dict[str, Any]]) -> np.ndarray:
    pcm = b"".join(base64.b64decode(d["delta"]) for d in deltas)
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768


@pytest.mark.asyncio
async def test_websocket_audio_is_the_answer_spoken(
    server: tuple[str, Any], espeak: TtsEngine
) -> None:
    base_url, _app = server
    events = await ws_turn(base_url.replace("http", "ws") + "/v1/realtime")
    done = of(events, "response.done")[0]
    assert done["response"]["status"] == "completed"
    shown = "".join(e["delta"] for e in of(events, "response.output_audio_transcript.delta"))
    phrases = [e["delta"] for e in of(events, "voxtral.output_audio.spoken")]
    assert not of(events, "response.output_text.delta")  # one text stream: the transcript
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
    # As with OpenAI's API, the output audio buffer events are WebRTC-only.
    assert not [e for e in events if e["type"].startswith("output_audio_buffer.")]


def buffer_events(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The output_audio_buffer.* events, in order, as (what happened, response id)."""
    return [
        (e["type"].removeprefix("output_audio_buffer."), e["response_id"])
        for e in events
        if e["type"].startswith("output_audio_buffer.")
    ]


class ListeningClient(Client):
    """The browser stand-in that also hears the server's speech track: every frame's
    48 kHz mono samples in `frames`, in arrival order. Without `mic`, audio goes as appends
    on the channel and the offer only receives audio."""

    def __init__(self, mic: bool = True) -> None:
        super().__init__()
        self.mic = mic
        self.frames: list[np.ndarray] = []
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
                self.frames.append(pcm.astype(np.float32) / 32768)
                if rms(self.frames[-1]) > 0.01:
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
        await client.wait_for("session.created")
        client.channel.send(SPOKEN_EVENTS)
        done = await client.wait_for("response.done")
        # The track goes on with silence after the answer: keep listening a moment longer
        # than the jitter buffer holds, so the answer's tail has arrived.
        ended = len(client.frames)
        while len(client.frames) < ended + 20:  # 400 ms of track
            client.changed.clear()
            await asyncio.wait_for(client.changed.wait(), 10)
        await client.wait_for("output_audio_buffer.stopped")
    finally:
        await client.close()
    assert done["response"]["status"] == "completed"
    # The client is told when the answer's audio started and when it had all been played.
    answer = done["response"]["id"]
    assert buffer_events(client.events) == [("started", answer), ("stopped", answer)]
    types = [e["type"] for e in client.events]
    started = types.index("output_audio_buffer.started")
    assert types.index("response.created") < started
    assert started < types.index("voxtral.output_audio.spoken")  # before its first phrase
    shown = "".join(e["delta"] for e in client.events if e["type"].endswith("transcript.delta"))
    phrases = [e["delta"] for e in client.events if e["type"] == "voxtral.output_audio.spoken"]
    assert shown == SCRIPT and "".join(phrases) == SCRIPT
    heard = np.concatenate(client.frames)
    expected = render(espeak, phrases, 48_000)
    loud = envelope(heard, 48_000) > 0.01
    assert loud.sum() * ENVELOPE_MS / 1000 > 0.5 * expected.size / 48_000  # speech, not silence
    assert similarity(heard, expected, 48_000) > 0.8  # Opus-coded, so less than exact
    assert done["timings"]["ttfa_ms"] >= done["timings"]["first_word_ms"] > 0


@pytest.mark.asyncio
async def test_no_audio_is_sent_once_the_server_hears_a_barge_in(
    one_phrase_server: tuple[str, Any], espeak: TtsEngine
) -> None:
    """Order, not milliseconds (benchmarks time it): the events of one WebSocket leave in the
    order the server made them, so an audio delta after the barge-in's speech_started is
    audio the server produced after it knew the user was talking."""
    base_url, _app = one_phrase_server
    events = await ws_turn(base_url.replace("http", "ws") + "/v1/realtime", True)
    done = of(events, "response.done")[0]
    assert done["response"]["status"] == "cancelled"
    cancelled = done["response"]["id"]
    types = [e["type"] for e in events]
    barge_in = types.index("input_audio_buffer.speech_started", types.index("response.created"))
    audio = [
        i
        for i, e in enumerate(events)
        if e["type"] == "response.output_audio.delta" and e["response_id"] == cancelled
    ]
    assert audio and audio[0] < barge_in  # the answer was being spoken when the user spoke
    after = [i for i in audio if i > barge_in]
    assert not after, f"{len(after)} audio deltas sent after the barge-in's speech_started"
    # Less was sent than the whole answer: the rest was dropped at the server.
    sent = decode([events[i] for i in audio])
    assert sent.size < render(espeak, [SCRIPT], WS_RATE).size
    # Its item keeps only the words the user heard, and says it was cut.
    item = done["response"]["output"][0]
    heard = item["content"][0]["transcript"]
    assert SCRIPT.startswith(heard) and len(heard) < len(SCRIPT)
    truncated = of(events, "conversation.item.truncated")
    assert [t["item_id"] for t in truncated] == [item["id"]]


@pytest.mark.asyncio
async def test_a_truncated_answer_keeps_the_words_heard(server: tuple[str, Any]) -> None:
    """A client that stopped playing halfway through the answer truncates its item there:
    the item (what the next answer reads) keeps the words heard by then; past the end of
    the audio is refused."""
    base_url, _app = server
    async with websockets.connect(base_url.replace("http", "ws") + "/v1/realtime") as ws:

        async def until(type_: str) -> dict[str, Any]:
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 60))
                deltas.extend([event] if event["type"] == "response.output_audio.delta" else [])
                if event["type"] == type_:
                    return dict(event)

        deltas: list[dict[str, Any]] = []
        await ws.send(DECLARE_16K)
        for message in appends(SPEECH):
            await ws.send(message)
        done = await until("response.done")
        item = done["response"]["output"][0]
        assert item["content"][0]["transcript"] == SCRIPT
        audio_ms = decode(deltas).size * 1000 // WS_RATE
        await ws.send(
            json.dumps(
                {
                    "type": "conversation.item.truncate",
                    "item_id": item["id"],
                    "content_index": 0,
                    "audio_end_ms": audio_ms // 2,
                }
            )
        )
        truncated = await until("conversation.item.truncated")
        assert truncated["audio_end_ms"] == audio_ms // 2
        await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": item["id"]}))
        heard = (await until("conversation.item.retrieved"))["item"]["content"][0]["transcript"]
        assert heard and SCRIPT.startswith(heard) and len(heard) < len(SCRIPT)
        await ws.send(
            json.dumps(
                {
                    "type": "conversation.item.truncate",
                    "item_id": item["id"],
                    "content_index": 0,
                    "audio_end_ms": audio_ms + 1000,
                }
            )
        )
        error = (await until("error"))["error"]
        assert error["code"] == "invalid_audio_end_ms"


@pytest.mark.asyncio
async def test_the_webrtc_track_is_silent_from_the_frame_after_a_barge_in() -> None:
    from voxtral_server.api.transports.audio_track import FRAME_SAMPLES, SpeechTrack

    track = SpeechTrack(lambda _event: None)
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
    server: tuple[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    base_url, app = server
    baseline = on_server(app, idle(app))
    async with websockets.connect(base_url.replace("http", "ws") + "/v1/realtime") as ws:
        await ws.send(DECLARE_16K)
        for message in appends(SPEECH):
            await ws.send(message)
        while json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] != (
            "response.output_audio.delta"
        ):
            pass
    # The session closed mid-answer: its speech, audio pump and finishing task all ended.
    assert on_server(app, idle(app)) == baseline
    # An ordinary disconnect, not an error (it used to log a traceback from the writer).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    events = await ws_turn(base_url.replace("http", "ws") + "/v1/realtime")  # next one works
    assert of(events, "response.done")[0]["response"]["status"] == "completed"


class TrackLog:
    """What a call's speech track did, in order, recorded on the server's loop as it happens:
    one entry per frame handed to the RTP sender (True if the frame carries speech), and
    CLEARED when a barge-in dropped the queued speech (`SpeechTrack.clear`)."""

    CLEARED = "cleared"

    def __init__(self, track: Any) -> None:
        self.entries: list[bool | str] = []
        recv, clear = track.recv, track.clear

        async def logged_recv() -> Any:
            frame = await recv()
            self.entries.append(bool(frame.to_ndarray().any()))  # silence is all zeros
            return frame

        def logged_clear() -> None:
            self.entries.append(self.CLEARED)
            clear()

        track.recv, track.clear = logged_recv, logged_clear


def speech_runs(flags: list[bool]) -> int:
    return sum(1 for i, loud in enumerate(flags) if loud and (i == 0 or not flags[i - 1]))


@pytest.mark.asyncio
async def test_webrtc_track_sends_no_speech_after_a_barge_in(server: tuple[str, Any]) -> None:
    """Counted in frames, not milliseconds (benchmarks time it): once the barge-in reached
    the track, every frame it sends is silence, and the client hears no more speech than the
    track sent before it."""
    base_url, app = server
    on_server(app, idle(app))  # calls of earlier tests are gone: the one left is ours
    client = ListeningClient(mic=False)
    try:
        await client.connect(base_url)
        await client.wait_for("session.created")
        client.channel.send(SPOKEN_EVENTS)
        (call,) = app.state.server.peers.calls
        log = TrackLog(call.speech_track)
        client.channel.send(DECLARE_16K)  # the appends below go on the data channel
        for message in appends(SPEECH):
            client.channel.send(message)
        await asyncio.wait_for(client.sound.wait(), 30)  # the answer is heard
        sent_before = len(client.events)
        # The user talks over it (no pause after, so no new turn starts meanwhile).
        for message in appends(SPEECH[int(0.3 * 16000) : int(2.7 * 16000)]):
            client.channel.send(message)
        done = await client.wait_for("response.done")
        # Go on hearing the track for longer than aiortc's audio jitter buffer (16 packets)
        # holds, so every frame sent before the barge-in has arrived.
        ended = len(client.frames)
        while len(client.frames) < ended + 25:
            client.changed.clear()
            await asyncio.wait_for(client.changed.wait(), 10)
    finally:
        await client.close()
    assert done["response"]["status"] == "cancelled"
    assert any(
        e["type"] == "input_audio_buffer.speech_started" for e in client.events[sent_before:]
    )
    # The client was told the answer's audio started, then that the barge-in cleared it.
    answer = done["response"]["id"]
    heard = [e for e in buffer_events(client.events) if e[1] == answer]
    assert heard == [("started", answer), ("cleared", answer)]
    assert TrackLog.CLEARED in log.entries, "the barge-in never reached the call's track"
    cut = log.entries.index(TrackLog.CLEARED)
    before = [e for e in log.entries[:cut] if isinstance(e, bool)]
    after = [e for e in log.entries[cut + 1 :] if isinstance(e, bool)]
    assert any(before), "no speech left the track before the barge-in"
    assert after and not any(after), f"{sum(after)} speech frames sent after the barge-in"
    # The client: speech it heard is speech sent before the barge-in (an Opus frame's tail
    # may spill into the silent frame after each run of speech), and then only silence.
    loud = [rms(pcm) > 0.01 for pcm in client.frames]
    assert sum(loud) <= sum(before) + speech_runs(before), (
        f"heard {sum(loud)} loud frames, the track sent {sum(before)} before the barge-in"
    )
    assert not any(loud[-10:]), "the client still hears speech after the barge-in"


@pytest.mark.asyncio
async def test_webrtc_a_cancelled_answer_s_audio_is_announced_cleared(
    server: tuple[str, Any],
) -> None:
    base_url, _app = server
    client = ListeningClient()
    try:
        await client.connect(base_url)
        started = await client.wait_for("output_audio_buffer.started")
        client.send({"type": "response.cancel"})  # while it speaks: seconds of it are left
        done = await client.wait_for("response.done")
        await client.wait_for("output_audio_buffer.cleared")
    finally:
        await client.close()
    answer = done["response"]["id"]
    assert done["response"]["status"] == "cancelled" and started["response_id"] == answer
    assert buffer_events(client.events) == [("started", answer), ("cleared", answer)]
