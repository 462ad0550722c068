"""Audio formats on the wire: audio/pcm at 24 kHz (OpenAI's default) or 16 kHz (this
server's extension), G.711 µ-law and A-law at 8 kHz, in and out; the resampler and codecs
under them."""

from __future__ import annotations

import base64
import json
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import soxr
from conftest import SAMPLE_WAV, SCRIPT
from fakes import FakeTransport
from wire import PCM16K, session_update

from voxtral_server.api import audio_formats as af
from voxtral_server.api.session import Session
from voxtral_server.api.speech import WebSocketAudioOut
from voxtral_server.config import Settings
from voxtral_server.models import g711
from voxtral_server.models.audio import SAMPLE_RATE, read_audio_file
from voxtral_server.models.resample import StreamResampler, resample
from voxtral_server.models.voxtral import VoxtralEngine

SPEECH = read_audio_file(SAMPLE_WAV)  # 16 kHz: speech 0.3-2.7 s, then silence
WAIT_S = 60


def tone(hz: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def peak_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.fft.rfftfreq(audio.size, 1 / rate)[spectrum.argmax()])


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(audio, np.float64) ** 2)))


def chunked(audio: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    """`audio` in pieces of random sizes, empty and one-sample pieces included."""
    rng = np.random.default_rng(seed)
    i = 0
    while i < audio.size:
        n = int(rng.choice([0, 1, 7, 160, 480, 1234]))
        yield audio[i : i + n]
        i += n


def encode_wire(audio16k: np.ndarray, fmt: af.AudioFormat) -> bytes:
    """What a client sends: 16 kHz float audio in `fmt` (resampled by soxr, a reference
    independent of the server's resampler)."""
    audio = soxr.resample(audio16k, SAMPLE_RATE, fmt.rate) if fmt.rate != SAMPLE_RATE else audio16k
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    return af.encode_audio(pcm, fmt)


def append(data: bytes) -> str:
    return json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()}
    )


FORMATS = {
    "pcm24k": af.AudioFormat("audio/pcm", 24000),
    "pcm16k": af.AudioFormat("audio/pcm", 16000),
    "pcmu": af.AudioFormat("audio/pcmu", 8000),
    "pcma": af.AudioFormat("audio/pcma", 8000),
}


# ------------------------------------------------------------------ codecs and resampler


def test_g711_matches_the_reference_implementation_in_every_value() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop  # CPython's own G.711 (removed in 3.13): the reference while it exists

    every_byte = bytes(range(256))
    every_sample = np.arange(-32768, 32768, dtype=np.int16)
    pcm_bytes = every_sample.astype("<i2").tobytes()
    assert (
        g711.ulaw_to_pcm16(every_byte) == np.frombuffer(audioop.ulaw2lin(every_byte, 2), "<i2")
    ).all()
    assert (
        g711.alaw_to_pcm16(every_byte) == np.frombuffer(audioop.alaw2lin(every_byte, 2), "<i2")
    ).all()
    assert g711.pcm16_to_ulaw(every_sample) == audioop.lin2ulaw(pcm_bytes, 2)
    assert g711.pcm16_to_alaw(every_sample) == audioop.lin2alaw(pcm_bytes, 2)


@pytest.mark.parametrize(("from_rate", "to_rate"), [(24000, 16000), (8000, 16000), (16000, 8000)])
def test_streaming_resampling_is_the_same_whatever_the_chunks(from_rate: int, to_rate: int) -> None:
    """No clicks at append boundaries: any cut of the stream gives the samples of the whole."""
    audio = soxr.resample(SPEECH, SAMPLE_RATE, from_rate).astype(np.float32)
    whole = resample(audio, from_rate, to_rate)
    for seed in range(3):
        stream = StreamResampler(from_rate, to_rate)
        pieces = [stream.feed(piece) for piece in chunked(audio, seed)]
        streamed = np.concatenate([*pieces, stream.flush()])
        assert streamed.size == whole.size == -(-audio.size * to_rate // from_rate)
        np.testing.assert_allclose(streamed, whole, atol=1e-6)


@pytest.mark.parametrize(("from_rate", "hz"), [(24000, 1000), (24000, 5000), (8000, 440)])
def test_a_tone_keeps_its_pitch_loudness_and_timing(from_rate: int, hz: int) -> None:
    source = tone(hz, from_rate, 1.0)
    stream = StreamResampler(from_rate, SAMPLE_RATE)
    out = np.concatenate([stream.feed(piece) for piece in chunked(source, 0)])
    middle = out[800:-800]  # away from where the tone starts
    assert abs(peak_hz(middle, SAMPLE_RATE) - hz) <= 2
    assert rms(middle) == pytest.approx(rms(source), rel=0.01)
    # Aligned with the input, not delayed: sample for sample the tone at 16 kHz.
    np.testing.assert_allclose(
        middle, tone(hz, SAMPLE_RATE, 1.0)[800 : 800 + middle.size], atol=2e-3
    )
    # No click anywhere: no step between neighbours larger than the tone's own steepest.
    steepest = 2 * np.pi * hz / SAMPLE_RATE * 0.5
    assert np.abs(np.diff(out[200:])).max() <= steepest * 1.05


def test_the_resampler_holds_back_only_a_few_milliseconds() -> None:
    """What VAD judges must not lag: 20 ms appends come out as ~20 ms at once."""
    for rate, most_ms in ((24000, 2), (8000, 5)):
        stream = StreamResampler(rate, SAMPLE_RATE)
        out = sum(stream.feed(np.zeros(rate // 50, np.float32)).size for _ in range(10))
        assert 200 - out * 1000 / SAMPLE_RATE <= most_ms


# ------------------------------------------------------------------ sessions


async def open_session(engine: VoxtralEngine, **kwargs: Any) -> tuple[Session, FakeTransport]:
    t = FakeTransport()
    session = Session(engine, Settings(), t, **kwargs)
    await session.start()
    return session, t


async def update(session: Session, t: FakeTransport, session_fields: dict[str, Any]) -> None:
    await session.handle_text(json.dumps({"type": "session.update", "session": session_fields}))


@pytest.mark.asyncio
async def test_a_session_that_declares_nothing_is_openais_default(
    scripted_engine: VoxtralEngine,
) -> None:
    from openai.types.realtime import SessionCreatedEvent, SessionUpdatedEvent

    session, t = await open_session(scripted_engine)
    try:
        created = SessionCreatedEvent.model_validate(t.of("session.created")[0])
        assert created.session.audio.input.format.rate == 24000  # type: ignore[union-attr]
        audio = t.of("session.created")[0]["session"]["audio"]
        assert (
            audio["input"]["format"]
            == audio["output"]["format"]
            == {
                "type": "audio/pcm",
                "rate": 24000,
            }
        )
        await update(
            session,
            t,
            {
                "audio": {
                    "input": {"format": {"type": "audio/pcmu"}},
                    "output": {"format": {"type": "audio/pcma"}},
                }
            },
        )
        updated = SessionUpdatedEvent.model_validate(t.of("session.updated")[0])
        assert updated.session.audio.input.format.type == "audio/pcmu"  # type: ignore[union-attr]
        assert updated.session.audio.output.format.type == "audio/pcma"  # type: ignore[union-attr]
    finally:
        session.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fmt", "named"),
    [
        ({"type": "audio/pcm", "rate": 44100}, "audio/pcm at 44100 Hz"),
        ({"type": "audio/opus"}, "'audio/opus'"),
        ({"type": "audio/pcmu", "rate": 16000}, "audio/pcmu is always 8000 Hz"),
    ],
)
@pytest.mark.parametrize("direction", ["input", "output"])
async def test_an_unsupported_format_is_named_and_the_session_keeps_its_own(
    scripted_engine: VoxtralEngine, fmt: dict[str, Any], named: str, direction: str
) -> None:
    session, t = await open_session(scripted_engine)
    try:
        await update(session, t, {"audio": {direction: {"format": {"type": "audio/pcmu"}}}})
        await update(session, t, {"instructions": "x", "audio": {direction: {"format": fmt}}})
        error = t.of("error")[0]["error"]
        assert error["code"] == "unsupported_audio_format"
        assert named in error["message"] and f"session.audio.{direction}.format" in error["message"]
        await update(session, t, {})
        state = t.of("session.updated")[-1]["session"]
        assert state["audio"][direction]["format"] == {"type": "audio/pcmu"}
        assert state.get("instructions") is None  # the whole update was refused
    finally:
        session.close()


async def committed_audio(engine: VoxtralEngine, fmt: af.AudioFormat, wire: bytes) -> np.ndarray:
    """The 16 kHz audio a push-to-talk turn sent as `wire` (in `fmt`, appends of ~20 ms)
    gave the model."""
    session, t = await open_session(engine)
    try:
        declared = fmt.describe()
        await session.handle_text(session_update(None, format=declared, turn_detection=None))
        step = len(encode_wire(np.zeros(320, np.float32), fmt))  # bytes of 20 ms
        for i in range(0, len(wire), step):
            await session.handle_text(append(wire[i : i + step]))
        await session.handle_text('{"type": "input_audio_buffer.commit"}')
        await session.handle_text('{"type": "response.create"}')
        done = await t.wait_for("response.done", within_s=WAIT_S)
        assert done["response"]["status"] == "completed", t.of("error")
        assert "".join(e["delta"] for e in t.of("response.output_text.delta")) == SCRIPT
        return session.conversation.history()[0].audio
    finally:
        session.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("name", list(FORMATS))
async def test_the_same_clip_in_any_format_reaches_the_model_the_same(
    scripted_engine: VoxtralEngine, name: str
) -> None:
    fmt = FORMATS[name]
    heard = await committed_audio(scripted_engine, fmt, encode_wire(SPEECH, fmt))
    # As long as the clip, to the sample (the commit takes what the resampler held back).
    assert abs(heard.size - SPEECH.size) <= 1
    # The same sound, as far as the format carries it (G.711: telephone band, 8 bits).
    expected = (
        SPEECH
        if fmt.rate >= SAMPLE_RATE
        else soxr.resample(soxr.resample(SPEECH, 16000, 8000), 8000, 16000)
    )
    n = min(heard.size, expected.size)
    assert np.corrcoef(heard[:n], expected[:n])[0, 1] > (0.999 if fmt.type == "audio/pcm" else 0.99)


@pytest.mark.asyncio
async def test_24khz_speech_ends_where_it_ends(scripted_engine: VoxtralEngine) -> None:
    """The bug a stock client saw: 24 kHz audio read as 16 kHz, so speech 'ended' 1.5x late."""
    ends = {}
    for name in ("pcm24k", "pcm16k"):
        fmt = FORMATS[name]
        session, t = await open_session(scripted_engine)
        try:
            if name == "pcm16k":
                await session.handle_text(session_update())
            wire = encode_wire(SPEECH, fmt)
            step = fmt.rate * 2 // 25  # 40 ms appends
            for i in range(0, len(wire), step):
                await session.handle_text(append(wire[i : i + step]))
            stopped = await t.wait_for("input_audio_buffer.speech_stopped", within_s=WAIT_S)
            ends[name] = stopped["audio_end_ms"]
        finally:
            session.close()
    assert 2400 <= ends["pcm16k"] <= 3000  # the speech ends at ~2.7 s
    assert abs(ends["pcm24k"] - ends["pcm16k"]) <= 64  # two VAD frames


@pytest.mark.asyncio
async def test_a_format_change_applies_from_the_next_append(scripted_engine: VoxtralEngine) -> None:
    """Audio already appended keeps the format it came in; nothing is cleared or refused."""
    session, t = await open_session(scripted_engine)
    try:
        half = SPEECH.size // 2
        await session.handle_text(session_update(None, turn_detection=None))
        await session.handle_text(append(encode_wire(SPEECH[:half], FORMATS["pcm16k"])))
        await session.handle_text(session_update(None, format={"type": "audio/pcmu"}))
        await session.handle_text(append(encode_wire(SPEECH[half:], FORMATS["pcmu"])))
        await session.handle_text('{"type": "input_audio_buffer.commit"}')
        await session.handle_text('{"type": "response.create"}')
        await t.wait_for("response.done", within_s=WAIT_S)
        heard = session.conversation.history()[0].audio
        assert abs(heard.size - SPEECH.size) <= 32  # a few samples
        assert not t.of("error")
    finally:
        session.close()


# ------------------------------------------------------------------ speech out


class ToneTts:
    """A TTS engine that speaks a 600 Hz tone, 0.5 s per phrase, in 20 ms chunks at 22.05 kHz;
    with `hold`, each phrase waits for it to be set first."""

    name = "tone"
    sample_rate = 22050

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.hold = hold

    def stream(self, text: str) -> Iterator[np.ndarray]:
        if self.hold is not None:
            self.hold.wait(WAIT_S)
        pcm = (tone(600, self.sample_rate, 0.5) * 32767).astype(np.int16)
        for i in range(0, pcm.size, 441):
            yield pcm[i : i + 441]

    def close(self) -> None:
        pass


def decode_out(deltas: list[dict[str, Any]], fmt: af.AudioFormat) -> np.ndarray:
    data = b"".join(base64.b64decode(d["delta"]) for d in deltas)
    if fmt.type == "audio/pcmu":
        pcm = g711.ulaw_to_pcm16(data)
    elif fmt.type == "audio/pcma":
        pcm = g711.alaw_to_pcm16(data)
    else:
        pcm = np.frombuffer(data, "<i2")
    return pcm.astype(np.float32) / 32768


async def spoken(
    engine: VoxtralEngine, output: dict[str, Any] | None, tts: ToneTts
) -> tuple[Session, FakeTransport]:
    session, t = await open_session(engine, tts=tts)
    session.audio_out = WebSocketAudioOut(t.send, lambda: session.config.output_format, lead_s=60)
    audio: dict[str, Any] = {"input": {"format": PCM16K, "turn_detection": None}}
    if output is not None:
        audio["output"] = {"format": output}
    await update(session, t, {"audio": audio})
    await session.handle_text(append(encode_wire(SPEECH, FORMATS["pcm16k"])))
    await session.handle_text('{"type": "input_audio_buffer.commit"}')
    await session.handle_text('{"type": "response.create"}')
    return session, t


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["pcm24k", "pcm16k", "pcmu", "pcma"])
async def test_speech_goes_out_in_the_sessions_output_format(
    scripted_engine: VoxtralEngine, name: str
) -> None:
    fmt = FORMATS[name]
    output = None if name == "pcm24k" else fmt.describe()  # 24 kHz: declared by nobody
    session, t = await spoken(scripted_engine, output, ToneTts())
    try:
        done = await t.wait_for("response.done", within_s=WAIT_S)
        assert done["response"]["status"] == "completed"
        heard = decode_out(t.of("response.output_audio.delta"), fmt)
        phrases = len(t.of("response.output_audio_transcript.delta"))
        assert phrases >= 1
        assert heard.size == pytest.approx(phrases * 0.5 * fmt.rate, abs=fmt.rate // 100)
        assert abs(peak_hz(heard, fmt.rate) - 600) <= 3
        assert rms(heard) == pytest.approx(0.5 / np.sqrt(2), rel=0.03)
    finally:
        session.close()
        await session.wait_closed()


@pytest.mark.asyncio
async def test_the_output_format_cannot_change_while_an_answer_is_spoken(
    scripted_engine: VoxtralEngine,
) -> None:
    hold = threading.Event()
    session, t = await spoken(scripted_engine, None, ToneTts(hold))
    try:
        await t.wait_for("response.created", within_s=WAIT_S)
        await update(session, t, {"audio": {"output": {"format": {"type": "audio/pcmu"}}}})
        error = t.of("error")[-1]["error"]
        assert error["code"] == "output_audio_format_busy" and "response.done" in error["message"]
        await update(session, t, {"audio": {"output": {"format": {"type": "audio/pcm"}}}})  # same
        assert t.of("session.updated")[-1]["session"]["audio"]["output"]["format"]["rate"] == 24000
        hold.set()
        await t.wait_for("response.done", within_s=WAIT_S)
        await update(session, t, {"audio": {"output": {"format": {"type": "audio/pcmu"}}}})
        assert t.of("session.updated")[-1]["session"]["audio"]["output"]["format"] == {
            "type": "audio/pcmu"
        }
    finally:
        hold.set()
        session.close()
        await session.wait_closed()
