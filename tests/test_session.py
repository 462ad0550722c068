"""The session core through a fake transport: turns, cancel, barge-in, session.update."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SAMPLE_WAV, SCRIPT
from fakes import FakeTransport, frames
from wire import PUSH_TO_TALK, append_event, session_update

from voxtral_server.api.session import Session
from voxtral_server.config import Settings
from voxtral_server.models.audio import SAMPLE_RATE, read_audio_file
from voxtral_server.models.voxtral import VoxtralEngine

SPEECH = read_audio_file(SAMPLE_WAV)  # speech 0.3-2.7 s, then 1.3 s of silence


async def new_session(engine: VoxtralEngine, **update: object) -> tuple[Session, FakeTransport]:
    """A started session; with `update`, that session.update sent (declaring 16 kHz input)."""
    transport = FakeTransport()
    session = Session(engine, Settings(), transport)
    await session.start()
    if update:
        await session.handle_text(session_update(update))
    return session, transport


def words(transport: FakeTransport) -> list[str]:
    return [e["delta"].strip() for e in transport.of("response.output_text.delta")]


@pytest.mark.asyncio
async def test_server_vad_turn_answers_by_itself(scripted_engine: VoxtralEngine) -> None:
    session, t = await new_session(scripted_engine)
    for frame in frames(SPEECH):
        session.append_audio(frame)
    done = await t.wait_for("response.done")
    # OpenAI's item lifecycle: the user's item as soon as it is committed, then the answer's
    # item with its first word, its content part, the words, and everything closed in order.
    lifecycle = [k for k in t.types() if not k.endswith(".delta")]
    assert lifecycle == [
        "session.created",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    user, answer = (e["item"] for e in t.of("conversation.item.added"))
    committed = t.of("input_audio_buffer.committed")[0]
    assert user["id"] == committed["item_id"] and user["role"] == "user"
    assert user["content"][0]["type"] == "input_audio"
    assert answer["role"] == "assistant" and answer["status"] == "in_progress"
    assert t.of("conversation.item.added")[1]["previous_item_id"] == user["id"]
    assert {e["item_id"] for e in t.of("response.output_text.delta")} == {answer["id"]}
    final = t.of("conversation.item.done")[1]["item"]
    assert final["status"] == "completed"
    assert final["content"] == [{"type": "output_text", "text": SCRIPT}]
    assert done["response"]["output"] == [final]
    assert done["response"]["usage"]["output_tokens"] == done["timings"]["tokens"]
    assert words(t) == SCRIPT.split()
    assert t.of("response.output_text.done")[0]["text"] == SCRIPT
    assert done["response"]["status"] == "completed"
    timings = done["timings"]
    assert timings["first_word_ms"] > 0 and timings["transport"] == "fake"
    assert timings["words"] == len(SCRIPT.split())
    started = t.of("input_audio_buffer.speech_started")[0]["audio_start_ms"]
    stopped = t.of("input_audio_buffer.speech_stopped")[0]["audio_end_ms"]
    assert 150 <= started <= 450 and 2400 <= stopped <= 3000  # where the speech is
    session.close()


@pytest.mark.asyncio
async def test_push_to_talk_waits_for_response_create(scripted_engine: VoxtralEngine) -> None:
    session, t = await new_session(scripted_engine, audio={"input": {"turn_detection": None}})
    assert t.of("session.updated")[0]["session"]["audio"]["input"]["turn_detection"] is None
    for frame in frames(SPEECH, ms=100):
        await session.handle_text(append_event(frame))
    assert "input_audio_buffer.speech_started" not in t.types()
    await session.handle_text('{"type": "input_audio_buffer.commit"}')
    assert t.types()[-3:] == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert "response.created" not in t.types()
    await session.handle_text('{"type": "response.create"}')
    await t.wait_for("response.done")
    assert words(t) == SCRIPT.split()
    session.close()


@pytest.mark.asyncio
async def test_response_cancel_ends_cancelled(scripted_engine: VoxtralEngine) -> None:
    session, t = await new_session(scripted_engine, audio={"input": {"turn_detection": None}})
    await session.handle_text(append_event(SPEECH))
    await session.handle_text('{"type": "input_audio_buffer.commit"}')
    await session.handle_text('{"type": "response.create"}')
    await t.wait_for("response.output_text.delta")
    await session.handle_text('{"type": "response.cancel"}')
    done = await t.wait_for("response.done")
    assert done["response"]["status"] == "cancelled"
    assert len(words(t)) < len(SCRIPT.split())
    # The engine is free: the next turn completes.
    await session.handle_text(append_event(SPEECH))
    await session.handle_text('{"type": "input_audio_buffer.commit"}')
    await session.handle_text('{"type": "response.create"}')
    assert (await t.wait_for("response.done", 2))["response"]["status"] == "completed"
    session.close()


@pytest.mark.asyncio
async def test_barge_in_cancels_the_answer(scripted_engine: VoxtralEngine) -> None:
    session, t = await new_session(scripted_engine)
    speech_only = SPEECH[: int(2.8 * SAMPLE_RATE)]
    silence = np.zeros(int(0.6 * SAMPLE_RATE), np.float32)
    for frame in frames(np.concatenate([speech_only, silence])):
        session.append_audio(frame)
    await t.wait_for("response.created")
    await t.wait_for("response.output_text.delta")
    for frame in frames(speech_only):  # the user talks over the answer
        session.append_audio(frame)
    done = await t.wait_for("response.done")
    assert done["response"]["status"] == "cancelled"
    assert t.types().count("input_audio_buffer.speech_started") == 2
    session.close()


@pytest.mark.asyncio
async def test_session_update_switches_mode_language_and_instructions(
    scripted_engine: VoxtralEngine,
) -> None:
    session, t = await new_session(
        scripted_engine,
        type="transcription",
        instructions="Be brief.",
        audio={"input": {"transcription": {"language": "fr"}, "turn_detection": None}},
    )
    state = t.of("session.updated")[0]["session"]
    assert state["type"] == "transcription" and state["instructions"] == "Be brief."
    assert state["audio"]["input"]["transcription"]["language"] == "fr"
    assert (session.mode, session.language) == ("transcribe", "fr")
    await session.handle_text(append_event(SPEECH))
    # A transcription session writes each committed turn down by itself.
    await session.handle_text('{"type": "input_audio_buffer.commit"}')
    item_id = t.of("input_audio_buffer.committed")[0]["item_id"]
    done = await t.wait_for("conversation.item.input_audio_transcription.completed")
    deltas = t.of("conversation.item.input_audio_transcription.delta")
    assert done["item_id"] == item_id and {d["item_id"] for d in deltas} == {item_id}
    assert [d["delta"].strip() for d in deltas] == SCRIPT.split()
    assert done["transcript"] == SCRIPT and "response.created" not in t.types()
    await session.handle_text('{"type": "response.create", "event_id": "e1"}')
    refused = (await t.wait_for("error"))["error"]
    assert refused["code"] == "not_in_transcription_session" and refused["event_id"] == "e1"
    await session.handle_text(
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "audio": {
                        "input": {
                            "turn_detection": {"type": "server_vad", "silence_duration_ms": 800}
                        }
                    }
                },
            }
        )
    )
    td = t.of("session.updated")[1]["session"]["audio"]["input"]["turn_detection"]
    assert td["silence_duration_ms"] == 800 and td["type"] == "server_vad"
    session.close()


@pytest.mark.asyncio
async def test_chat_keeps_the_conversation(scripted_engine: VoxtralEngine) -> None:
    session, t = await new_session(scripted_engine, audio={"input": {"turn_detection": None}})
    for i in range(2):
        await session.handle_text(append_event(SPEECH))
        await session.handle_text('{"type": "input_audio_buffer.commit"}')
        await session.handle_text('{"type": "response.create"}')
        await t.wait_for("response.done", i + 1)
    assert [m.text for m in session.conversation.history() if m.role == "assistant"] == [
        SCRIPT,
        SCRIPT,
    ]
    session.close()


class _BusyOnce:
    """An engine that refuses the first request (queue full), then serves normally."""

    def __init__(self, engine: VoxtralEngine) -> None:
        self.engine = engine
        self.refused = False

    def submit(self, request, sink):  # type: ignore[no-untyped-def]
        from voxtral_server.models.types import EngineError

        if not self.refused:
            self.refused = True
            raise EngineError("engine_busy", "16 requests are already waiting (engine.queue_size)")
        return self.engine.submit(request, sink)

    def promote(self, handle):  # type: ignore[no-untyped-def]
        self.engine.promote(handle)


@pytest.mark.asyncio
async def test_a_busy_engine_keeps_the_turn_for_a_retry(scripted_engine: VoxtralEngine) -> None:
    transport = FakeTransport()
    session = Session(_BusyOnce(scripted_engine), Settings(), transport)  # type: ignore[arg-type]
    await session.start()
    await session.handle_text(PUSH_TO_TALK)
    await session.handle_text(append_event(SPEECH))
    await session.handle_text('{"type": "input_audio_buffer.commit"}')
    await session.handle_text('{"type": "response.create"}')
    assert transport.of("error")[-1]["error"]["code"] == "engine_busy"
    await session.handle_text('{"type": "response.create"}')  # the same turn, retried
    await transport.wait_for("response.done")
    assert words(transport) == SCRIPT.split()
    session.close()


@pytest.mark.asyncio
async def test_vad_offsets_survive_a_session_update_after_audio(
    scripted_engine: VoxtralEngine,
) -> None:
    # The page sends session.update once audio already flows; the turn must keep its audio.
    session, t = await new_session(scripted_engine)
    lead = np.zeros(10 * SAMPLE_RATE, np.float32)  # 10 s of room noise before the update
    for frame in frames(lead):
        session.append_audio(frame)
    await session.handle_text(
        json.dumps(
            {
                "type": "session.update",
                "session": {"audio": {"input": {"turn_detection": {"type": "server_vad"}}}},
            }
        )
    )
    for frame in frames(SPEECH):
        session.append_audio(frame)
    await t.wait_for("response.done")
    started = t.of("input_audio_buffer.speech_started")[0]["audio_start_ms"]
    stopped = t.of("input_audio_buffer.speech_stopped")[0]["audio_end_ms"]
    assert 10_150 <= started <= 10_450 and 12_400 <= stopped <= 13_000  # stream offsets
    turn_audio = session.conversation.history()[0].audio
    assert 2.3 <= turn_audio.size / SAMPLE_RATE <= 3.2  # the speech itself, not silence
    session.close()


@pytest.mark.asyncio
async def test_conversations_share_one_vad_worker(scripted_engine: VoxtralEngine) -> None:
    """Every conversation's audio is judged by the server's one VAD worker, in batches:
    two people talking at once both get their turns, each from its own stream state."""
    from voxtral_server.models.vad import VadWorker

    worker = VadWorker()
    try:
        pairs = []
        for _ in range(2):
            t = FakeTransport()
            session = Session(scripted_engine, Settings(), t, vad_worker=worker)
            await session.start()
            pairs.append((session, t))
        assert worker.streams == 2
        for frame in frames(SPEECH):  # interleaved: the worker sees both streams at once
            for session, _ in pairs:
                session.append_audio(frame)
        for _session, t in pairs:
            done = await t.wait_for("response.done")
            assert done["response"]["status"] == "completed" and words(t) == SCRIPT.split()
            started = t.of("input_audio_buffer.speech_started")[0]["audio_start_ms"]
            assert 200 <= started <= 400  # speech starts ~0.3 s into the clip, for each
        assert worker.batches < worker.frames  # some passes judged both streams together
        for session, _ in pairs:
            session.close()
        assert worker.streams == 0
    finally:
        worker.close()
