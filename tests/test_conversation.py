"""The conversation as OpenAI's Realtime API shows it: items in, items out, responses over
whatever the conversation holds, out-of-band answers, captions of the user's words."""

from __future__ import annotations

import asyncio
import json
import time
import typing
from typing import Any

import pytest
from conftest import SAMPLE_WAV, SCRIPT, TOOL_ANSWER, TOOL_ARGS, TOOL_NAME
from fakes import FakeTransport, frames
from servers import SharedEngine
from wire import PCM16K, pcm16_b64

from voxtral_server.api.session import Session
from voxtral_server.config import Settings
from voxtral_server.models.audio import read_audio_file
from voxtral_server.models.chunking import ChunkSink
from voxtral_server.models.types import Request, RequestHandle
from voxtral_server.models.voxtral import VoxtralEngine

SPEECH = read_audio_file(SAMPLE_WAV)  # speech 0.3-2.7 s, then 1.3 s of silence


class Recording(SharedEngine):
    """The real engine, remembering every request it was given."""

    def __init__(self, engine: VoxtralEngine) -> None:
        super().__init__(engine)
        self.requests: list[Request] = []

    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        self.requests.append(request)
        return super().submit(request, sink)


async def new_session(
    engine: VoxtralEngine, **update: object
) -> tuple[Session, FakeTransport, Recording]:
    recording = Recording(engine)
    transport = FakeTransport()
    session = Session(recording, Settings(), transport)  # type: ignore[arg-type]
    await session.start()
    ptt = {"audio": {"input": {"turn_detection": None, "format": PCM16K}}, **update}
    await session.handle_text(json.dumps({"type": "session.update", "session": ptt}))
    return session, transport, recording


async def send(session: Session, type_: str, **fields: Any) -> None:
    await session.handle_text(json.dumps({"type": type_, **fields}))


def user_text(text: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": text}],
        **fields,
    }


def error_of(t: FakeTransport, n: int = 1) -> dict[str, Any]:
    errors = t.of("error")
    assert len(errors) >= n, t.types()
    return dict(errors[n - 1]["error"])


@pytest.mark.asyncio
async def test_a_text_message_is_answered_with_no_audio(scripted_engine: VoxtralEngine) -> None:
    session, t, engine = await new_session(scripted_engine)
    await send(session, "conversation.item.create", item=user_text("What is the capital?"))
    added = t.of("conversation.item.added")[0]
    assert added["item"]["content"] == [{"type": "input_text", "text": "What is the capital?"}]
    assert t.of("conversation.item.done")[0]["item"]["id"] == added["item"]["id"]
    assert "response.created" not in t.types()  # an item alone is not answered
    await send(session, "response.create")
    done = await t.wait_for("response.done")
    assert done["response"]["status"] == "completed"
    assert done["response"]["output"][0]["content"][0]["text"] == SCRIPT
    (request,) = engine.requests
    assert request.audio is None
    assert [(m.role, m.text) for m in request.history] == [("user", "What is the capital?")]
    # The answer is in the conversation: the next question reads both.
    await send(session, "conversation.item.create", item=user_text("And then?"))
    await send(session, "response.create")
    await t.wait_for("response.done", 2)
    roles = [(m.role, m.text) for m in engine.requests[1].history]
    assert roles == [
        ("user", "What is the capital?"),
        ("assistant", SCRIPT),
        ("user", "And then?"),
    ]
    session.close()


@pytest.mark.asyncio
async def test_items_go_where_asked_and_are_retrieved_and_deleted(
    scripted_engine: VoxtralEngine,
) -> None:
    session, t, engine = await new_session(scripted_engine)
    await send(session, "conversation.item.create", item=user_text("second", id="b"))
    await send(
        session,
        "conversation.item.create",
        item=user_text("first", id="a"),
        previous_item_id="root",
    )
    system = {
        "type": "message",
        "role": "system",
        "content": [{"type": "input_text", "text": "Be brief."}],
    }
    await send(session, "conversation.item.create", item=system, previous_item_id="a")
    added = t.of("conversation.item.added")
    assert [e.get("previous_item_id") for e in added] == [None, None, "a"]
    assert [i.id for i in session.conversation.items][::2] == ["a", "b"]
    await send(session, "conversation.item.retrieve", item_id="b")
    assert t.of("conversation.item.retrieved")[0]["item"]["content"][0]["text"] == "second"
    await send(session, "conversation.item.delete", item_id="a", event_id="del")
    assert t.of("conversation.item.deleted")[0]["item_id"] == "a"
    await send(session, "response.create")
    await t.wait_for("response.done")
    history = engine.requests[0].history
    assert [(m.role, m.text) for m in history] == [("system", "Be brief."), ("user", "second")]
    # Bad forms: clear errors naming what is wrong, and the session goes on.
    await send(session, "conversation.item.retrieve", item_id="a", event_id="e1")
    assert error_of(t) == {**error_of(t), "code": "item_retrieve_invalid_item_id", "event_id": "e1"}
    await send(session, "conversation.item.create", item=user_text("again", id="b"), event_id="e2")
    assert error_of(t, 2)["code"] == "item_id_exists" and error_of(t, 2)["event_id"] == "e2"
    await send(session, "conversation.item.create", item=user_text("x"), previous_item_id="zz")
    assert error_of(t, 3)["code"] == "previous_item_not_found" and "zz" in error_of(t, 3)["message"]
    image = {"type": "message", "role": "user", "content": [{"type": "input_image"}]}
    await send(session, "conversation.item.create", item=image)
    assert error_of(t, 4)["code"] == "unsupported"
    await send(session, "conversation.item.create", item={"type": "message", "content": []})
    assert error_of(t, 5)["code"] == "invalid_item" and "role" in error_of(t, 5)["message"]
    await send(session, "conversation.item.delete", item_id="nope")
    assert error_of(t, 6)["code"] == "item_not_found"
    await send(session, "conversation.item.create")  # no item at all
    assert error_of(t, 7)["code"] == "invalid_event" and "item" in error_of(t, 7)["message"]
    session.close()


@pytest.mark.asyncio
async def test_a_response_takes_its_own_settings_and_out_of_band_stays_out(
    scripted_engine: VoxtralEngine,
) -> None:
    session, t, engine = await new_session(scripted_engine)
    await send(session, "conversation.item.create", item=user_text("Hello", id="q"))
    before = len(session.conversation)
    response = {
        "conversation": "none",
        "instructions": "Answer in French.",
        "max_output_tokens": 3,
        "output_modalities": ["text"],
        "metadata": {"topic": "greeting"},
        "input": [{"type": "item_reference", "id": "q"}, user_text("Summarise.")],
    }
    await send(session, "response.create", response=response)
    done = await t.wait_for("response.done")
    assert done["response"].get("conversation_id") is None
    assert done["response"]["metadata"] == {"topic": "greeting"}
    assert done["timings"]["tokens"] <= 3  # its own token limit
    assert len(session.conversation) == before  # nothing written to the conversation
    assert len(t.of("conversation.item.added")) == 1 and t.of("response.output_item.added")
    (request,) = engine.requests
    assert request.instructions == "Answer in French." and request.max_new_tokens == 3
    assert [(m.role, m.text) for m in request.history] == [
        ("user", "Hello"),
        ("user", "Summarise."),
    ]
    # An ordinary response afterwards reads the conversation with the session's settings.
    await send(session, "response.create")
    second = await t.wait_for("response.done", 2)
    assert second["response"]["conversation_id"] == session.conversation_id
    assert engine.requests[1].instructions is None and engine.requests[1].max_new_tokens is None
    await send(session, "response.create", response={"max_output_tokens": 0}, event_id="bad")
    assert error_of(t)["code"] == "invalid_event" and "max_output_tokens" in error_of(t)["message"]
    session.close()


@pytest.mark.asyncio
async def test_nothing_to_answer_is_refused_clearly(scripted_engine: VoxtralEngine) -> None:
    session, t, _ = await new_session(scripted_engine)
    await send(session, "response.create", event_id="e1")
    error = error_of(t)
    assert error["code"] == "nothing_to_answer" and error["event_id"] == "e1"
    assistant = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Hi"}],
    }
    await send(session, "conversation.item.create", item=assistant)
    await send(session, "response.create")
    assert error_of(t, 2)["code"] == "nothing_to_answer"
    assert "response.created" not in t.types()
    session.close()


@pytest.mark.asyncio
async def test_first_word_counts_from_the_response_create(scripted_engine: VoxtralEngine) -> None:
    """A push-to-talk client that waits before asking for the answer: the server's first-word
    time starts at its response.create, so it can be no longer than what the client itself
    saw from sending response.create to the first word (it used to include the wait)."""
    session, t, _ = await new_session(scripted_engine)
    await session.handle_text(
        json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_b64(SPEECH)})
    )
    await send(session, "input_audio_buffer.commit")
    await asyncio.sleep(0.5)  # the client's own pause: the scenario, not a synchronisation
    asked = time.perf_counter()
    await send(session, "response.create")
    await t.wait_for("response.output_text.delta")
    seen_ms = (time.perf_counter() - asked) * 1000
    done = await t.wait_for("response.done")
    assert 0 < done["timings"]["first_word_ms"] <= seen_ms
    session.close()


@pytest.mark.asyncio
async def test_the_users_words_are_written_down_without_holding_up_the_answer(
    scripted_engine: VoxtralEngine,
) -> None:
    transport = FakeTransport()
    session = Session(scripted_engine, Settings(), transport)
    await session.start()
    update = {"audio": {"input": {"transcription": {"model": "whisper-1"}}}}
    await session.handle_text(json.dumps({"type": "session.update", "session": update}))
    state = transport.of("session.updated")[0]["session"]
    assert state["audio"]["input"]["transcription"]["model"] == "whisper-1"
    for frame in frames(SPEECH):
        session.append_audio(frame)
    done = await transport.wait_for("conversation.item.input_audio_transcription.completed")
    await transport.wait_for("response.done")
    item_id = transport.of("input_audio_buffer.committed")[0]["item_id"]
    deltas = transport.of("conversation.item.input_audio_transcription.delta")
    assert done["item_id"] == item_id and done["transcript"] == SCRIPT
    assert "".join(d["delta"] for d in deltas) == SCRIPT and done["usage"]["type"] == "tokens"
    # The answer went first: the caption is the lowest priority work.
    types = transport.types()
    first_word = types.index("response.output_text.delta")
    assert first_word < types.index("conversation.item.input_audio_transcription.delta")
    # The item carries its transcript from then on.
    await session.handle_text(
        json.dumps({"type": "conversation.item.retrieve", "item_id": item_id})
    )
    retrieved = transport.of("conversation.item.retrieved")[0]["item"]
    assert retrieved["content"][0] == {"type": "input_audio", "transcript": SCRIPT}
    session.close()


@pytest.mark.asyncio
async def test_truncate_refuses_what_it_cannot_cut(scripted_engine: VoxtralEngine) -> None:
    session, t, _ = await new_session(scripted_engine)
    await send(session, "conversation.item.create", item=user_text("Hello", id="u"))
    await send(session, "response.create")
    done = await t.wait_for("response.done")
    answer = done["response"]["output"][0]["id"]
    await send(session, "conversation.item.truncate", item_id="u", audio_end_ms=0)
    assert error_of(t)["code"] == "invalid_item" and "assistant" in error_of(t)["message"]
    await send(session, "conversation.item.truncate", item_id="gone", audio_end_ms=0)
    assert error_of(t, 2)["code"] == "item_not_found"
    # A text answer has no audio: any point after its start is beyond it.
    await send(session, "conversation.item.truncate", item_id=answer, audio_end_ms=500)
    assert error_of(t, 3)["code"] == "invalid_audio_end_ms" and "500" in error_of(t, 3)["message"]
    await send(session, "conversation.item.truncate", item_id=answer, audio_end_ms=-1)
    assert error_of(t, 4)["code"] == "invalid_event"
    await send(session, "conversation.item.truncate", item_id=answer, audio_end_ms=0)
    assert t.of("conversation.item.truncated")[0]["item_id"] == answer
    assert session.conversation.get(answer).text == ""  # type: ignore[union-attr]
    session.close()


@pytest.mark.asyncio
async def test_every_event_validates_against_the_openai_sdk_types(
    scripted_engine: VoxtralEngine,
) -> None:
    """The Agents SDK validates every server event with the `openai` package's own types (a
    failure becomes an error in the client): a voice turn with captions, a text turn, an
    out-of-band answer, a cancel, item retrieval, deletion, truncation and an error."""
    from openai.types.realtime import RealtimeServerEvent
    from pydantic import ValidationError

    classes = {
        cls.model_fields["type"].annotation.__args__[0]: cls
        for cls in typing.get_args(typing.get_args(RealtimeServerEvent)[0])
    }
    transport = FakeTransport()
    session = Session(scripted_engine, Settings(), transport)
    await session.start()
    captions = {"audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}}}
    await session.handle_text(json.dumps({"type": "session.update", "session": captions}))
    for frame in frames(SPEECH):
        session.append_audio(frame)
    await transport.wait_for("conversation.item.input_audio_transcription.completed")
    await transport.wait_for("response.done")
    await send(session, "conversation.item.create", item=user_text("Hi", id="t"))
    await send(session, "response.create", response={"metadata": {"client_event_id": "x"}})
    done = await transport.wait_for("response.done", 2)
    await send(
        session, "response.create", response={"conversation": "none", "input": [user_text("So?")]}
    )
    await transport.wait_for("response.output_text.delta", 2 * len(SCRIPT.split()) + 1)
    await send(session, "response.cancel")
    await transport.wait_for("response.done", 3)
    answer = done["response"]["output"][0]["id"]
    await send(session, "conversation.item.retrieve", item_id=answer)
    await send(session, "conversation.item.truncate", item_id=answer, audio_end_ms=0)
    await send(session, "conversation.item.delete", item_id="t")
    await send(session, "conversation.item.retrieve", item_id="t")  # an error event
    session.close()
    problems = []
    for event in transport.events:
        try:
            classes[event["type"]].model_validate(event)
        except ValidationError as exc:
            problems.append(f"{event['type']}: {exc}")
    assert not problems, "\n".join(problems)
    kinds = {event["type"] for event in transport.events}
    assert {
        "session.created",
        "session.updated",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.done",
        "conversation.item.retrieved",
        "conversation.item.truncated",
        "conversation.item.deleted",
        "error",
    } <= kinds


WEATHER_TOOL = {
    "type": "function",
    "name": TOOL_NAME,
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.mark.asyncio
async def test_a_spoken_question_calls_a_function_and_its_result_is_answered(
    tool_engine: VoxtralEngine,
) -> None:
    """Voxtral calls a function from speech: the call comes as a function_call item with its
    arguments; the client runs it, adds the output, and the answer uses it."""
    session, t, engine = await new_session(tool_engine, tools=[WEATHER_TOOL], tool_choice="auto")
    state = t.of("session.updated")[0]["session"]
    assert state["tools"][0]["name"] == TOOL_NAME and state["tool_choice"] == "auto"
    await session.handle_text(
        json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_b64(SPEECH)})
    )
    await send(session, "input_audio_buffer.commit")
    await send(session, "response.create")
    done = await t.wait_for("response.done")
    assert done["response"]["status"] == "completed"
    (call,) = done["response"]["output"]  # a call alone: no message item, no words
    assert call["type"] == "function_call" and call["name"] == TOOL_NAME
    assert json.loads(call["arguments"]) == json.loads(TOOL_ARGS)
    arguments = t.of("response.function_call_arguments.done")[0]
    assert arguments["call_id"] == call["call_id"] and arguments["item_id"] == call["id"]
    deltas = t.of("response.function_call_arguments.delta")
    assert "".join(d["delta"] for d in deltas) == call["arguments"]
    assert not t.of("response.output_text.delta")
    assert [e["item"]["type"] for e in t.of("conversation.item.done")] == [
        "message",
        "function_call",
    ]
    assert engine.requests[0].tools[0].name == TOOL_NAME
    # The client runs the function and hands back its output.
    output = {
        "type": "function_call_output",
        "call_id": call["call_id"],
        "output": '{"sky": "sunny"}',
    }
    await send(session, "conversation.item.create", item=output)
    await send(session, "response.create")
    second = await t.wait_for("response.done", 2)
    assert second["response"]["output"][0]["content"][0]["text"] == TOOL_ANSWER
    roles = [m.role for m in engine.requests[1].history]
    assert roles == ["user", "assistant", "tool"]
    # Bad forms: an output without a call id, arguments that are not JSON, a tool_choice
    # naming no tool.
    await send(session, "conversation.item.create", item={"type": "function_call_output"})
    assert error_of(t)["code"] == "invalid_item" and "call_id" in error_of(t)["message"]
    bad_call = {"type": "function_call", "name": "f", "arguments": "{nope", "call_id": "c1"}
    await send(session, "conversation.item.create", item=bad_call)
    assert error_of(t, 2)["code"] == "invalid_item" and "JSON" in error_of(t, 2)["message"]
    await send(session, "conversation.item.create", item=user_text("And tomorrow?"))
    await send(
        session,
        "response.create",
        response={"tool_choice": {"type": "function", "name": "nope"}},
        event_id="tc",
    )
    assert error_of(t, 3)["code"] == "invalid_tool_choice" and error_of(t, 3)["event_id"] == "tc"
    session.close()


@pytest.mark.asyncio
async def test_an_audio_item_is_heard_in_the_sessions_input_format(
    scripted_engine: VoxtralEngine,
) -> None:
    session, t, engine = await new_session(scripted_engine)
    item = {
        "type": "message",
        "role": "user",
        "content": [
            {"type": "input_audio", "audio": pcm16_b64(SPEECH)},
            {"type": "input_text", "text": "Who said that?"},
        ],
    }
    await send(session, "conversation.item.create", item=item)
    added = t.of("conversation.item.added")[0]["item"]
    assert [part["type"] for part in added["content"]] == ["input_audio", "input_text"]
    await send(session, "response.create")
    assert (await t.wait_for("response.done"))["response"]["status"] == "completed"
    (message,) = engine.requests[0].history
    assert message.text == "Who said that?" and message.audio is not None
    assert message.audio.size == SPEECH.size  # 16 kHz in, as declared: nothing resampled
    bad = {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "%%"}]}
    await send(session, "conversation.item.create", item=bad, event_id="a1")
    assert error_of(t)["code"] == "invalid_audio" and error_of(t)["event_id"] == "a1"
    session.close()
