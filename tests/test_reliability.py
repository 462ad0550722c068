"""Reliability: races and hostile input must never break a conversation or the server."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from conftest import SAMPLE_WAV, SCRIPT
from fakes import FakeTransport, frames
from servers import running_server
from wire import DECLARE_16K, PUSH_TO_TALK, append_event

from voxtral_server import ttft
from voxtral_server.api.metrics import Metrics, TurnRecord
from voxtral_server.api.session import Session
from voxtral_server.api.speech import WebSocketAudioOut
from voxtral_server.cli import LOG_FORMAT
from voxtral_server.config import ConfigError, Settings, load_settings
from voxtral_server.models.audio import read_audio_file
from voxtral_server.models.chunking import ChunkSink
from voxtral_server.models.types import Chunk, Request, RequestHandle
from voxtral_server.models.voxtral import VoxtralEngine

SPEECH = read_audio_file(SAMPLE_WAV)
WORDS = SCRIPT.split()
RECORD = TurnRecord(
    "sess_1", 1, "websocket", "chat", "completed", 30.0, 40.0, None, 0.2, 90.0, 11, 27, 400.0
)


class HeldAnswers:
    """The real engine, but each answer reaches the session only once it is complete, and
    then by `release`: so a test decides exactly where a cancel lands among the words."""

    def __init__(self, engine: VoxtralEngine) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.complete: asyncio.Queue[tuple[list[Chunk], ChunkSink]] = asyncio.Queue()

    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        held: list[Chunk] = []

        def hold(chunk: Chunk) -> None:  # engine thread
            held.append(chunk)
            if chunk.is_final:
                self.loop.call_soon_threadsafe(self.complete.put_nowait, (held, sink))

        return self.engine.submit(request, hold)

    def promote(self, handle: RequestHandle) -> None:
        self.engine.promote(handle)

    # The rest of the Engine contract, from the real engine.
    ready = property(lambda self: self.engine.ready)
    queue_depth = property(lambda self: self.engine.queue_depth)

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    def close(self, timeout: float = 30.0) -> None:
        pass


async def ask(session: Session) -> None:
    await session.handle_text(append_event(SPEECH))
    await session.handle_text('{"type": "input_audio_buffer.commit"}')
    await session.handle_text('{"type": "response.create"}')


@pytest.mark.asyncio
@pytest.mark.parametrize("delivered", range(len(WORDS) + 1))
async def test_a_cancel_anywhere_in_an_answer_leaves_the_conversation_working(
    scripted_engine: VoxtralEngine, delivered: int
) -> None:
    """The cancel lands after the engine has finished, with `delivered` of the answer's words
    shown to the client: whatever that number, the next turn is answered in full, and the
    history only ever holds what the client saw of each answer (never an empty one)."""
    engine = HeldAnswers(scripted_engine)
    t = FakeTransport()
    session = Session(engine, Settings(), t)  # type: ignore[arg-type]
    await session.start()
    await session.handle_text(PUSH_TO_TALK)
    await ask(session)
    chunks, sink = await engine.complete.get()
    words, final = chunks[:-1], chunks[-1]
    assert final.totals is not None and final.totals.status == "completed"
    for chunk in words[:delivered]:
        sink(chunk)
    if delivered:
        await t.wait_for("response.output_text.delta", delivered)
    await session.handle_text('{"type": "response.cancel"}')
    for chunk in [*words[delivered:], final]:
        sink(chunk)
    done = await t.wait_for("response.done")
    shown = "".join(e["delta"] for e in t.of("response.output_text.delta"))
    answers = [m.text for m in session.conversation.history() if m.role == "assistant"]
    if delivered == len(words):  # every word was out before the cancel: nothing was cut
        assert done["response"]["status"] == "completed" and shown == SCRIPT
        assert answers == [SCRIPT]
    else:
        assert done["response"]["status"] == "cancelled"
        assert answers == ([shown] if shown.strip() else [])

    await ask(session)  # the next turn, on the same conversation
    chunks, sink = await engine.complete.get()
    for chunk in chunks:
        sink(chunk)
    second = await t.wait_for("response.done", 2)
    assert second["response"]["status"] == "completed", second
    assert second["response"]["output"][0]["content"][0]["text"] == SCRIPT
    session.close()


FORGED = "TTFT session=sess_forged turn=1 transport=websocket mode=chat status=completed"


@pytest.mark.parametrize(
    "reason",
    [
        "TTFT turn=oops",  # made `voxtral-server ttft` exit 1 with a ValueError
        f"x\n2026-11-22 08:00:00,000 INFO voxtral_server.ttft: {FORGED}",  # a forged turn
        f"x 2026-11-22 08:00:00,000 INFO voxtral_server.ttft: {FORGED}",
    ],
)
def test_client_text_in_the_log_cannot_forge_or_break_a_ttft_line(
    tmp_path: Path, reason: str
) -> None:
    """The page's fallback reason is the client's text: it is quoted into its log line, and
    `voxtral-server ttft` reads only lines the server wrote, counting the others it skips."""
    log = tmp_path / "server.log"
    handler = logging.FileHandler(log, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        metrics = Metrics()
        metrics.turn(RECORD)
        metrics.fallback("sess_1", reason)
        metrics.error("sess_1", "invalid_event", reason)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    text = log.read_text(encoding="utf-8")
    assert text.count("\n") == 3, text  # one physical line per log call
    out = io.StringIO()
    assert ttft.run(log, out) == 0
    table = out.getvalue()
    assert table.startswith("1 turns"), table  # only the real turn
    assert "2 lines mentioning TTFT skipped" in table, table


@pytest.mark.asyncio
async def test_an_unknown_language_is_refused_when_set_and_a_valid_one_then_works(
    scripted_engine: VoxtralEngine,
) -> None:
    """ "zz" used to be accepted, then every transcription turn failed with a traceback."""
    t = FakeTransport()
    session = Session(scripted_engine, Settings(), t)
    await session.start()

    def update(language: str) -> str:
        audio = {"input": {"turn_detection": None, "transcription": {"language": language}}}
        return json.dumps(
            {"type": "session.update", "session": {"type": "transcription", "audio": audio}}
        )

    await session.handle_text(update("zz"))
    error = t.of("error")[0]["error"]
    assert error["code"] == "invalid_event"
    assert "language" in error["message"] and "'zz'" in error["message"], error
    assert session.language == "en" and not t.of("session.updated")  # nothing changed
    await session.handle_text(update("fr"))
    assert (
        t.of("session.updated")[0]["session"]["audio"]["input"]["transcription"]["language"] == "fr"
    )
    await session.handle_text(append_event(SPEECH))
    await session.handle_text('{"type": "input_audio_buffer.commit"}')  # written down
    done = await t.wait_for("conversation.item.input_audio_transcription.completed")
    assert done["transcript"] == SCRIPT, done
    session.close()


def test_an_unknown_language_in_the_config_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("transcribe:\n  language: zz\n")
    with pytest.raises(ConfigError, match=r"transcribe\.language.*'zz'"):
        load_settings(config)


# ------------------------------------------------------------------ a real server

TOKEN = "a-test-token-of-24-chars"


@pytest.fixture(scope="module")
def token_server(scripted_engine: VoxtralEngine) -> Iterator[str]:
    settings = Settings.model_validate({"server": {"auth_token": TOKEN}})
    with running_server(settings, scripted_engine) as (url, _app):
        yield url


async def raw_http(base_url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes as they are (a client library would refuse non-ASCII headers) and read
    what comes back until the server closes or goes quiet."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + body)
    await writer.drain()
    received = b""
    try:
        while len(received) < 65536:
            piece = await asyncio.wait_for(reader.read(4096), 10)
            if not piece:
                break
            received += piece
            if b"unauthorized" in received:
                break
    except TimeoutError:
        pass
    finally:
        writer.close()
    return received


@pytest.mark.asyncio
async def test_a_non_ascii_token_is_refused_not_a_server_error(token_server: str) -> None:
    """hmac.compare_digest on a non-ASCII str raised: HTTP 500 with a traceback."""
    bad = "Bearer tök€n".encode()
    upgrade = (
        b"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nAuthorization: " + bad + b"\r\n\r\n"
    )
    reply = await raw_http(token_server, upgrade)
    assert reply.startswith(b"HTTP/1.1 101"), reply[:200]
    assert b'"unauthorized"' in reply, reply[:400]  # the error event, then close 1008
    offer = b"v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=fingerprint:sha-256 AA\r\n"
    post = (
        b"POST /v1/realtime/calls HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp"
        b"\r\nContent-Length: "
        + str(len(offer)).encode()
        + b"\r\nAuthorization: "
        + bad
        + b"\r\nConnection: close\r\n\r\n"
    )
    reply = await raw_http(token_server, post, offer)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{token_server}/healthz")).status_code == 200


@pytest.mark.asyncio
async def test_a_lone_surrogate_gets_an_error_event_and_the_connection_lives_on(
    token_server: str,
) -> None:
    """`"event_id": "\\ud800"` closed the WebSocket silently (close 1000, nothing logged)."""
    url = token_server.replace("http://", "ws://") + "/v1/realtime"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        created = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert created["type"] == "session.created"
        await ws.send('{"type": "response.cancel", "event_id": "\\ud800"}')
        error = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert error["type"] == "error" and error["error"]["event_id"] == "\ud800", error
        await ws.send('{"type": "session.update", "session": {"instructions": "Be brief."}}')
        updated = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert updated["type"] == "session.updated", updated


@pytest.mark.asyncio
async def test_an_oversized_offer_is_refused_as_it_arrives(token_server: str) -> None:
    """A chunked body was buffered whole before the 64 KiB check (200 MiB raised RSS by 200
    MB); a 1 MB offer with Content-Length got a connection reset instead of a 413."""
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/sdp"}
    async with httpx.AsyncClient(timeout=60) as http:
        reply = await http.post(
            f"{token_server}/v1/realtime/calls", content=b"v=0\r\n" * 200_000, headers=headers
        )
        assert reply.status_code == 413 and reply.text.startswith("offer_too_large"), reply.text
        sent = 0
        total = 64 * 1024 * 1024

        async def body() -> AsyncIterator[bytes]:  # chunked: no Content-Length
            nonlocal sent
            while sent < total:
                sent += 65536
                yield b"a" * 65536

        try:
            reply = await http.post(
                f"{token_server}/v1/realtime/calls", content=body(), headers=headers
            )
            assert reply.status_code == 413, reply.text
        except httpx.TransportError:
            pass  # the server stopped reading and closed: as good as a 413 here
        assert sent < total, "the server read the whole 64 MiB body"
        assert (await http.head(f"{token_server}/healthz")).status_code == 200


# ------------------------------------------------------------------ chaos: failures mid-turn


class ChaosTts:
    """A TTS engine that speaks 20 ms of tone per phrase, or fails at `stage`."""

    name = "chaos"
    sample_rate = 16000

    def __init__(self, stage: str | None) -> None:
        self.stage = stage

    def stream(self, text: str) -> Iterator[np.ndarray]:
        if self.stage == "start":
            raise RuntimeError("injected: synthesis cannot start")
        yield np.full(320, 1000, np.int16)
        if self.stage == "mid":
            raise MemoryError("injected: synthesis died mid-phrase")

    def close(self) -> None:
        pass


class ChaosEngine(HeldAnswers):
    """The real engine, whose first answer's word chunks make the sink raise (on the
    engine's thread, inside generate)."""

    def __init__(self, engine: VoxtralEngine) -> None:
        self.engine = engine
        self.armed = True

    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        armed, self.armed = self.armed, False

        def failing(chunk: Chunk) -> None:
            if armed and not chunk.is_final:
                raise RuntimeError("injected: the engine failed mid-answer")
            sink(chunk)

        return self.engine.submit(request, failing)


@pytest.mark.asyncio
@pytest.mark.parametrize("stage", ["tts-start", "tts-mid", "engine"])
async def test_a_failure_at_any_stage_ends_that_turn_with_an_error_and_the_next_turn_works(
    scripted_engine: VoxtralEngine, stage: str
) -> None:
    """Speech caught only TtsError: any other exception left the answer waiting forever
    and every later response.create was refused."""
    engine: Any = ChaosEngine(scripted_engine) if stage == "engine" else scripted_engine
    t = FakeTransport()
    tts = ChaosTts(stage.removeprefix("tts-") if stage.startswith("tts") else None)
    session = Session(engine, Settings(), t, tts=tts)
    audio_out = WebSocketAudioOut(t.send, lambda: session.config.output_format)
    session.audio_out = audio_out
    await session.start()
    await session.handle_text(PUSH_TO_TALK)
    await ask(session)
    first = await t.wait_for("response.done")
    error = t.of("error")[0]["error"]
    if stage == "engine":
        assert first["response"]["status"] == "failed"
        assert error["code"] == "generation_failed" and "injected" in error["message"], error
    else:
        assert error["code"] == "tts_failed" and "injected" in error["message"], error
        assert first["response"]["output"][0]["content"][0]["transcript"] == SCRIPT  # words came
    tts.stage = None  # the next turn: nothing fails any more
    await ask(session)
    second = await t.wait_for("response.done", 2)
    assert second["response"]["status"] == "completed", second
    assert second["response"]["output"][0]["content"][0]["transcript"] == SCRIPT
    assert t.of("response.output_audio.delta"), "the next answer was spoken"
    session.close()
    await session.wait_closed()
    await audio_out.close()


@pytest.mark.asyncio
async def test_every_conversation_may_have_a_turn_waiting_none_is_refused(
    scripted_engine: VoxtralEngine,
) -> None:
    """32 people (server.max_sessions) end a spoken turn at the same moment: every turn is
    answered. The engine queue held 16, so half were refused with engine_busy and lost."""
    from voxtral_server.models.vad import VadWorker

    settings = Settings()
    count = settings.server.max_sessions
    worker = VadWorker()
    try:
        pairs = []
        for _ in range(count):
            t = FakeTransport()
            session = Session(scripted_engine, settings, t, vad_worker=worker)
            await session.start()
            pairs.append((session, t))
        for frame in frames(SPEECH):
            for session, _ in pairs:
                session.append_audio(frame)
        for session, t in pairs:
            done = await t.wait_for("response.done", within_s=120)
            assert done["response"]["status"] == "completed", (t.of("error"), done)
            assert not t.of("error")
            session.close()
    finally:
        worker.close()


def test_a_client_sending_audio_faster_than_allowed_is_made_to_wait() -> None:
    """One client flooding audio (1 MiB appends back to back) took the event loop and the
    VAD from everyone; past a burst it may now send at most `rate` x real time."""
    from voxtral_server.api.session.input import InputPacer

    now = [0.0]
    pacer = InputPacer(rate=10.0, burst_s=30.0, clock=lambda: now[0])
    assert pacer.delay_after(30.0) == 0.0  # a whole utterance at once: the free burst
    assert pacer.delay_after(24.0) == pytest.approx(2.4)  # 24 s more: wait 2.4 s
    now[0] += 2.4
    assert pacer.delay_after(0.0) == pytest.approx(0.0)  # caught up
    now[0] += 10.0  # ten seconds later, a live microphone's 40 ms never waits
    for _ in range(250):
        assert pacer.delay_after(0.04) == 0.0
        now[0] += 0.04


def test_speech_cut_at_the_utterance_limit_is_not_answered_twice() -> None:
    """A monologue is committed at audio.max_utterance_s; the VAD's later 'speech stopped'
    (its verdicts arrive after the audio) found nothing left and committed an empty turn,
    which the engine refused (empty_audio) — under load only, since it is a race."""
    from voxtral_server.api.session.input import InputBuffer, SpeechBegan, TurnEnded
    from voxtral_server.models.vad import SpeechStarted, SpeechStopped

    class HeardEverything:  # a VAD stream that has judged all the audio fed to it
        offset = 0

        def feed(self, audio: np.ndarray) -> None:
            self.offset += audio.size

    buffer = InputBuffer(max_utterance_s=2.0)
    buffer.use_vad(HeardEverything(), prefix_padding_ms=300)  # type: ignore[arg-type]
    tone = np.full(16000, 0.1, np.float32)
    assert isinstance(buffer.on_vad([SpeechStarted(0)])[0], SpeechBegan)
    events = [e for _ in range(3) for e in buffer.append(tone)]  # 3 s of speech
    assert [type(e) for e in events] == [TurnEnded]  # cut at 2 s
    assert events[0].audio.size == 2 * 16000
    assert buffer.on_vad([SpeechStopped(2 * 16000)]) == []  # nothing after the cut
    assert not buffer.speaking


@pytest.mark.asyncio
async def test_one_sessions_audio_flood_does_not_hold_up_another_session(
    scripted_engine: VoxtralEngine,
) -> None:
    """Server-VAD audio was judged on the event loop inside the append: 24 s of audio held
    every other session (and /healthz) until its last frame was judged. Now the append only
    queues it: another session's event is answered before the flood's verdicts exist."""
    from voxtral_server.models.vad import VadWorker

    worker = VadWorker()
    order: list[str] = []

    class Recording(FakeTransport):
        def __init__(self, who: str) -> None:
            super().__init__()
            self.who = who

        def send(self, event: Any) -> None:
            super().send(event)
            order.append(f"{self.who}:{self.events[-1]['type']}")

    try:
        flood_t, other_t = Recording("flood"), Recording("other")
        flood = Session(scripted_engine, Settings(), flood_t, vad_worker=worker)
        other = Session(scripted_engine, Settings(), other_t, vad_worker=worker)
        await flood.start()
        await other.start()
        speech = np.tile(SPEECH, 6)  # 24 s: speech starts 0.3 s in
        await flood.handle_text(DECLARE_16K)
        await flood.handle_text(append_event(speech))
        await other.handle_text('{"type": "session.update", "session": {}}')
        await flood_t.wait_for("input_audio_buffer.speech_started")
        assert order.index("other:session.updated") < order.index(
            "flood:input_audio_buffer.speech_started"
        ), order
        flood.close()
        other.close()
    finally:
        worker.close()


@pytest.mark.asyncio
async def test_a_closed_session_is_freed_once_its_tasks_have_ended(
    scripted_engine: VoxtralEngine,
) -> None:
    """The shared VAD worker kept the last batch it judged (its streams, whose callbacks hold
    their sessions) while it waited for more audio: a closed session, its history included,
    stayed in memory until somebody else spoke."""
    from voxtral_server.models.vad import VadWorker

    worker = VadWorker()
    try:
        transport = FakeTransport()
        session = Session(scripted_engine, Settings(), transport, vad_worker=worker)
        await session.start()
        await session.handle_text(DECLARE_16K)
        await session.handle_text(append_event(SPEECH))  # server VAD ends the turn
        await transport.wait_for("response.done")
        session.close()
        await session.wait_closed()
        freed = weakref.ref(session)
        del session
        gc.collect()
        assert freed() is None, [type(r).__name__ for r in gc.get_referrers(freed())]
    finally:
        worker.close()
