"""The `openai` Python SDK (3.57, in the project's venv), unchanged, against the real server:
`client.realtime.connect(...)` over the WebSocket as its documentation shows, and the REST
endpoints through `client.audio.transcriptions` and `client.chat.completions`.

Every server event of every session here is also checked against the reference shapes:
`openai.types.realtime.RealtimeServerEvent` (what the OpenAI Agents SDK validates every
event with) and pipecat's own parser (pipecat's service dies on an event it cannot parse).
The server answers every prompt with SCRIPT (the scripted tiny checkpoint) and speaks with
espeak-ng.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
import pytest
import soundfile as sf
import soxr
from aiortc import RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from clients import SPEECH, Client
from compat_harness import CLIENT_RATE, words
from conftest import SAMPLE_WAV, SCRIPT
from openai import AsyncOpenAI
from openai.types.realtime import RealtimeServerEvent
from pydantic import Field, TypeAdapter, ValidationError
from servers import running_server

from voxtral_server.config import Settings
from voxtral_server.models.audio import SAMPLE_RATE
from voxtral_server.models.voxtral import VoxtralEngine

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="install the Debian package espeak-ng"
)

SETTINGS = Settings().with_overrides({("tts", "engine"): "espeak"})
ANSWER = words(SCRIPT)
TYPED = "What is the capital of France?"
# The reference shape of every server event (discriminated by type, as the Agents SDK does).
REFERENCE: TypeAdapter[Any] = TypeAdapter(
    Annotated[RealtimeServerEvent, Field(discriminator="type")]
)
SERVER_VAD = {"type": "server_vad", "silence_duration_ms": 500}


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def ulaw(audio: np.ndarray) -> bytes:
    """G.711 mu-law bytes of float audio (the standard 8-segment companding)."""
    x = np.clip(np.round(audio * 32767), -32635, 32635).astype(np.int32)
    sign = (x < 0).astype(np.int32) << 7
    magnitude = np.abs(x) + 0x84
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


SPEECH_24K = soxr.resample(SPEECH, SAMPLE_RATE, CLIENT_RATE)
SILENCE_S = 1.5  # after the speech, so that server_vad ends the turn on audio time


@pytest.fixture(scope="module")
def server(scripted_engine: VoxtralEngine) -> Iterator[str]:
    with running_server(SETTINGS, scripted_engine) as (base_url, _app):
        yield base_url


def rejected_by_a_reference(event: dict[str, Any]) -> str | None:
    """Why the OpenAI types or pipecat's parser reject this server event, or None."""
    from pipecat.services.openai.realtime.events import parse_server_event

    try:
        REFERENCE.validate_python(event)
    except ValidationError as exc:
        return f"openai.types.realtime: {exc}"
    try:
        parse_server_event(json.dumps(event))
    except Exception as exc:  # pipecat raises a bare Exception carrying pydantic's text
        return f"pipecat: {str(exc)[:1500]}"
    return None


class Session:
    """One `client.realtime.connect` session; every raw server event is kept in order."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.events: list[dict[str, Any]] = []

    async def next(self, *types: str, within_s: float = 60) -> dict[str, Any]:
        """The next server event of one of `types` (those before it are kept, not
        returned); an `error` on the way fails the test with it. Waits on the connection
        itself: `within_s` only bounds a server that never answers."""
        while True:
            raw = await asyncio.wait_for(self.conn.recv_bytes(), within_s)
            event = json.loads(raw)
            self.events.append(event)
            if event["type"] in types:
                return event
            assert event["type"] != "error", f"waiting for {types}: {event}"

    def of(self, type_: str, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.events[since:] if e["type"] == type_]

    def types(self, since: int = 0) -> list[str]:
        return [e["type"] for e in self.events[since:]]

    def assert_all_valid(self) -> None:
        rejected = {}
        for event in self.events:
            if event["type"] not in rejected and (why := rejected_by_a_reference(event)):
                rejected[event["type"]] = why
        assert not rejected, f"rejected: {sorted(rejected)}\n" + "\n".join(
            f"{t}: {why[:800]}" for t, why in rejected.items()
        )

    async def send(self, event: dict[str, Any]) -> None:
        await self.conn.send(event)

    async def configure(self, **session: Any) -> dict[str, Any]:
        await self.conn.session.update(session={"type": "realtime", **session})
        return (await self.next("session.updated"))["session"]

    async def say(self, pcm: bytes, chunk: int = 4800) -> None:
        for i in range(0, len(pcm), chunk):
            await self.conn.input_audio_buffer.append(
                audio=base64.b64encode(pcm[i : i + chunk]).decode()
            )

    async def type_and_answer(self, text: str = TYPED, **response: Any) -> dict[str, Any]:
        """A typed user item, then response.create: the response.done event."""
        await self.conn.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": text}],
            }
        )
        await self.next("conversation.item.added")
        await self.conn.response.create(**({"response": response} if response else {}))
        return await self.next("response.done")


@asynccontextmanager
async def session(server: str, standard: bool = True) -> AsyncIterator[Session]:
    """A connected session. `standard=False`: it uses this server's extensions (16 kHz
    PCM), which OpenAI's types do not allow, so its events are not checked against them."""
    client = AsyncOpenAI(api_key="not-needed", base_url=server + "/v1")
    async with client.realtime.connect(model="gpt-realtime") as conn:
        s = Session(conn)
        await s.next("session.created")
        yield s
    if standard:
        s.assert_all_valid()
    assert not s.of("error"), s.of("error")


def user_text(text: str) -> dict[str, Any]:
    """A user message item holding typed text."""
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def audio_bytes(events: list[dict[str, Any]]) -> int:
    """How many bytes of audio response.output_audio.delta events carried."""
    return sum(len(base64.b64decode(e["delta"])) for e in events)


def answer_text(done: dict[str, Any]) -> str:
    """The assistant's words in a response.done's output items."""
    parts = [
        part.get("text") or part.get("transcript") or ""
        for item in done["response"]["output"]
        if item.get("type") == "message"
        for part in item.get("content", [])
    ]
    return words(" ".join(parts))


@pytest.mark.asyncio
async def test_a_client_that_declares_nothing_gets_24khz_pcm(server: str) -> None:
    """OpenAI's default (and only) PCM rate, in and out, is what session.created reports."""
    async with session(server) as s:
        audio = s.of("session.created")[0]["session"]["audio"]
        pcm = {"type": "audio/pcm", "rate": 24000}
        assert (audio["input"]["format"], audio["output"]["format"]) == (pcm, pcm)


@pytest.mark.asyncio
async def test_24khz_speech_is_heard_as_24khz(server: str) -> None:
    """The clip sent at 24 kHz (declared, as every stock client does) ends where the same
    clip sent at 16 kHz (the documented extension) ends, and both are answered."""
    ends = {}
    for rate, audio in ((CLIENT_RATE, SPEECH_24K), (SAMPLE_RATE, SPEECH)):
        async with session(server, standard=rate == CLIENT_RATE) as s:
            fmt = {"type": "audio/pcm", "rate": rate}
            updated = await s.configure(
                output_modalities=["text"],
                audio={"input": {"format": fmt, "turn_detection": SERVER_VAD}},
            )
            assert updated["audio"]["input"]["format"] == fmt
            await s.say(pcm16(np.concatenate([audio, np.zeros(int(SILENCE_S * rate))])))
            ends[rate] = (await s.next("input_audio_buffer.speech_stopped"))["audio_end_ms"]
            assert answer_text(await s.next("response.done")) == ANSWER
    # Silero judges 32 ms frames: the same audio may end one or two frames apart.
    assert abs(ends[CLIENT_RATE] - ends[SAMPLE_RATE]) <= 96, ends


@pytest.mark.asyncio
async def test_a_typed_item_is_answered_with_the_whole_item_lifecycle(server: str) -> None:
    """conversation.item.create (a user input_text) then response.create, no audio at all:
    the answer comes as its own assistant item, announced before its first word, in text
    only (output_modalities ["text"]), once."""
    async with session(server) as s:
        await s.configure(output_modalities=["text"])
        await s.conn.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": TYPED}],
            }
        )
        added = await s.next("conversation.item.added")
        assert added["item"]["role"] == "user" and added["item"]["id"]
        assert added["item"]["content"][0] == {"type": "input_text", "text": TYPED}
        await s.conn.response.create()
        start = s.events.index(await s.next("response.created"))
        done = await s.next("response.done")
        assert done["response"]["status"] == "completed"
        assert answer_text(done) == ANSWER
        types = s.types(start)
        lifecycle = [
            "response.created",
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ]
        firsts = [types.index(t) for t in lifecycle if t in types]
        assert [t for t in lifecycle if t in types] == lifecycle, types
        assert firsts == sorted(firsts), types
        deltas = s.of("response.output_text.delta", start)
        item_id = s.of("response.output_item.added", start)[0]["item"]["id"]
        assert item_id != added["item"]["id"]
        assert {d["item_id"] for d in deltas} == {item_id}
        assert words("".join(d["delta"] for d in deltas)) == ANSWER
        assert not [t for t in types if t.startswith("response.output_audio")], types


@pytest.mark.asyncio
async def test_an_audio_answer_has_one_text_stream_and_can_be_truncated(server: str) -> None:
    """With output_modalities ["audio"] the words come only as the audio's transcript (a
    second text stream doubles them in the Agents SDK, pipecat and LiveKit);
    conversation.item.truncate then cuts the item's text to what had been heard."""
    async with session(server) as s:
        await s.configure(output_modalities=["audio"])
        start = len(s.events)
        done = await s.type_and_answer()
        types = s.types(start)
        assert "response.output_text.delta" not in types, types
        transcript = "".join(
            d["delta"] for d in s.of("response.output_audio_transcript.delta", start)
        )
        assert words(transcript) == ANSWER == answer_text(done)
        audio_ms = audio_bytes(s.of("response.output_audio.delta")) / 2 / CLIENT_RATE * 1000
        item_id = done["response"]["output"][0]["id"]

        heard_ms = int(audio_ms / 2)
        await s.conn.conversation.item.truncate(
            item_id=item_id, content_index=0, audio_end_ms=heard_ms
        )
        truncated = await s.next("conversation.item.truncated")
        assert (truncated["item_id"], truncated["audio_end_ms"]) == (item_id, heard_ms)
        await s.conn.conversation.item.retrieve(item_id=item_id)
        item = (await s.next("conversation.item.retrieved"))["item"]
        kept = words(item["content"][0].get("transcript"))
        assert kept and len(kept) < len(ANSWER) and ANSWER.startswith(kept), kept


@pytest.mark.asyncio
async def test_output_audio_buffer_clear_cuts_the_answer_short(server: str) -> None:
    """response.cancel then output_audio_buffer.clear (what a client sends on barge-in, as
    the API documents) while the answer is being spoken: both accepted, the answer ends
    cancelled with less audio than the whole answer has."""
    async with session(server) as s:
        await s.configure(output_modalities=["audio"])
        whole = await s.type_and_answer()
        whole_audio = audio_bytes(s.of("response.output_audio.delta"))
        start = len(s.events)
        await s.conn.conversation.item.create(item=user_text(TYPED))
        await s.conn.response.create()
        await s.next("response.output_audio.delta")
        await s.conn.response.cancel()
        await s.conn.output_audio_buffer.clear()
        done = await s.next("response.done")
        assert whole["response"]["status"] == "completed"
        assert done["response"]["status"] == "cancelled"
        cut_audio = audio_bytes(s.of("response.output_audio.delta", start))
        assert cut_audio < whole_audio


@pytest.mark.asyncio
async def test_g711_in_and_out(server: str) -> None:
    """session.update declaring audio/pcmu in and out: session.updated says so, mu-law
    speech is heard and answered, and the answer's audio is mu-law at 8 kHz (one byte a
    sample: as long as the same answer in 24 kHz PCM)."""
    async with session(server) as s:
        pcm_answer = await s.type_and_answer()
        pcm_bytes = sum(
            len(base64.b64decode(d["delta"])) for d in s.of("response.output_audio.delta")
        )
        start = len(s.events)
        fmt = {"type": "audio/pcmu"}
        updated = await s.configure(
            audio={
                "input": {"format": fmt, "turn_detection": SERVER_VAD},
                "output": {"format": fmt},
            }
        )
        assert updated["audio"]["input"]["format"]["type"] == "audio/pcmu"
        assert updated["audio"]["output"]["format"]["type"] == "audio/pcmu"
        speech_8k = soxr.resample(SPEECH, SAMPLE_RATE, 8000)
        await s.say(ulaw(np.concatenate([speech_8k, np.zeros(int(SILENCE_S * 8000))])), 800)
        done = await s.next("response.done")
        assert answer_text(done) == answer_text(pcm_answer) == ANSWER
        ulaw_bytes = audio_bytes(s.of("response.output_audio.delta", start))
        seconds_pcm, seconds_ulaw = pcm_bytes / 2 / CLIENT_RATE, ulaw_bytes / 8000
        assert abs(seconds_ulaw - seconds_pcm) < 0.05 * seconds_pcm, (seconds_pcm, seconds_ulaw)


@pytest.mark.asyncio
async def test_the_users_words_come_as_a_transcription(server: str) -> None:
    """audio.input.transcription on: after the user's turn is committed, its transcription
    arrives for that item (Voxtral's transcribe mode)."""
    async with session(server) as s:
        await s.configure(
            output_modalities=["text"],
            audio={"input": {"transcription": {"model": "voxtral"}, "turn_detection": SERVER_VAD}},
        )
        await s.say(pcm16(np.concatenate([SPEECH_24K, np.zeros(int(SILENCE_S * CLIENT_RATE))])))
        committed = await s.next("input_audio_buffer.committed")
        done = await s.next("conversation.item.input_audio_transcription.completed")
        assert done["item_id"] == committed["item_id"]
        assert words(done["transcript"]) == ANSWER  # the tiny model transcribes as SCRIPT too


@pytest.mark.asyncio
async def test_an_out_of_band_response_echoes_its_metadata_and_stays_out(server: str) -> None:
    """response.create with conversation "none", its own input and metadata (LiveKit waits
    for its metadata in response.created): answered, metadata echoed, and the answer is not
    added to the conversation."""
    async with session(server) as s:
        await s.configure(output_modalities=["text"])
        metadata = {"client_event_id": "response_create_1"}
        await s.conn.response.create(
            response={
                "conversation": "none",
                "metadata": metadata,
                "input": [
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": TYPED}],
                    }
                ],
            }
        )
        created = await s.next("response.created")
        assert created["response"]["metadata"] == metadata
        done = await s.next("response.done")
        assert answer_text(done) == ANSWER
        assert not s.of("conversation.item.added"), "an out-of-band answer joined the conversation"


@pytest.mark.asyncio
async def test_unknown_and_malformed_events_get_clear_errors_and_the_session_goes_on(
    server: str,
) -> None:
    """An unknown event type still gets `unknown_event`; each bad form of the new events gets
    an error naming what is wrong, tied to the event by its event_id; afterwards the session
    still answers."""
    bad = {
        "unknown_event": {"type": "conversation.frobnicate"},
        "missing item": {"type": "conversation.item.create"},
        "item_nope": {"type": "conversation.item.truncate", "item_id": "item_nope",
                      "content_index": 0, "audio_end_ms": 10},
        "item_gone": {"type": "conversation.item.delete", "item_id": "item_gone"},
        "item_lost": {"type": "conversation.item.retrieve", "item_id": "item_lost"},
        "item_before": {"type": "conversation.item.create", "previous_item_id": "item_before",
                        "item": {"type": "message", "role": "user",
                                 "content": [{"type": "input_text", "text": TYPED}]}},
        "44100": {"type": "session.update", "session": {"type": "realtime", "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 44100}}}}},
        "audio/opus": {"type": "session.update", "session": {"type": "realtime", "audio": {
            "output": {"format": {"type": "audio/opus"}}}}},
    }  # fmt: skip
    async with session(server) as s:
        for n, (named, event) in enumerate(bad.items()):
            await s.conn.send_raw(json.dumps({**event, "event_id": f"bad_{n}"}))
            reply = await s.next("error", "session.updated")
            assert reply["type"] == "error", (named, reply)
            error = reply["error"]
            assert error["event_id"] == f"bad_{n}", error
            if named == "unknown_event":
                assert error["code"] == "unknown_event"
            else:
                assert error["code"] != "unknown_event", (named, error)
                assert named in error["message"] or named.split()[-1] in error["message"], error
        s.events = [e for e in s.events if e["type"] != "error"]  # the expected ones
        done = await s.type_and_answer()
        assert answer_text(done) == ANSWER


@pytest.mark.asyncio
async def test_rest_transcription_and_chat_completions_with_audio(server: str) -> None:
    """The same engine over REST, through the SDK's own methods: a transcription (whole and
    streamed) and a streamed chat completion with an input_audio content part."""
    wav = io.BytesIO()
    sf.write(wav, SPEECH, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    client = AsyncOpenAI(api_key="not-needed", base_url=server + "/v1")
    whole = await client.audio.transcriptions.create(
        model="voxtral", file=("speech.wav", wav.getvalue(), "audio/wav")
    )
    assert words(whole.text) == ANSWER
    stream = await client.audio.transcriptions.create(
        model="voxtral", file=("speech.wav", wav.getvalue(), "audio/wav"), stream=True
    )
    pieces = [e.delta async for e in stream if e.type == "transcript.text.delta"]
    assert words("".join(pieces)) == ANSWER
    chat = await client.chat.completions.create(
        model="voxtral",
        stream=True,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "input_audio": {
                            "data": base64.b64encode(wav.getvalue()).decode(),
                            "format": "wav",
                        },
                    }
                ],
            }
        ],
    )
    content = [c.choices[0].delta.content or "" async for c in chat if c.choices]
    assert words("".join(content)) == ANSWER


@pytest.mark.asyncio
async def test_a_webrtc_call_made_through_the_sdk_frames_and_clears_its_audio(server: str) -> None:
    """`client.realtime.calls.create(sdp=..., session=...)` with an aiortc peer (the SDK's
    WebRTC path, the microphone a wav file): the spoken answer to the speech is framed by
    `output_audio_buffer.started` / `stopped` on the data channel, and
    `output_audio_buffer.clear` during the next answer gives `output_audio_buffer.cleared`."""
    peer = Client()
    peer.player = MediaPlayer(str(SAMPLE_WAV))
    peer.pc.addTrack(peer.player.audio)
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    client = AsyncOpenAI(api_key="not-needed", base_url=server + "/v1")
    try:
        answer = await client.realtime.calls.create(
            sdp=peer.pc.localDescription.sdp,
            session={"type": "realtime", "output_modalities": ["audio"]},
        )
        await peer.pc.setRemoteDescription(RTCSessionDescription(answer.text, "answer"))
        await peer.wait_for("output_audio_buffer.stopped")
        first = [e["type"] for e in peer.events]
        assert first.index("output_audio_buffer.started") < first.index("response.done")
        peer.events.clear()
        peer.send({"type": "conversation.item.create", "item": user_text(TYPED)})
        peer.send({"type": "response.create"})
        await peer.wait_for("output_audio_buffer.started")
        peer.send({"type": "response.cancel"})
        peer.send({"type": "output_audio_buffer.clear"})
        await peer.wait_for("output_audio_buffer.cleared")
        assert (await peer.wait_for("response.done"))["response"]["status"] == "cancelled"
        assert not [e for e in peer.events if e["type"] == "error"], peer.events
    finally:
        await peer.close()
