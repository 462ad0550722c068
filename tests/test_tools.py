"""Function calling, model side: what the model is offered, what it calls, what comes back.

The prompt is checked against mistral_common's own encoding of the same conversation built
from its protocol classes; the calls come from a tiny checkpoint scripted to answer a user
turn with `get_weather(city=Paris, unit=celsius)` and the function's result with words,
through the real engine. The vLLM engine's calls come from a fake vLLM server streaming
`delta.tool_calls` the way vLLM's `mistral` tool parser does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from clients import cli
from conftest import SCRIPT, TOOL_ANSWER, TOOL_ARGS, TOOL_NAME, speech_like
from mistral_common.protocol.instruct.chunk import AudioChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.audio import Audio
from test_vllm import Collector, FakeVllm, vllm_settings

from voxtral_server.api.inprocess import InProcessServer
from voxtral_server.models import types as t
from voxtral_server.models.audio import wav_bytes
from voxtral_server.models.chat import chat_messages, mistral_call_id, offered_tools
from voxtral_server.models.tools import call_ids, parse_mistral
from voxtral_server.models.vllm import VllmEngine
from voxtral_server.models.voxtral import VoxtralEngine

AUDIO = speech_like(1.0)
WEATHER = t.Tool(
    TOOL_NAME,
    "The weather in a city now",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
)
CLOCK = t.Tool("get_time", "The time in a city now", {"type": "object", "properties": {}})
CALL = t.ToolCall("call_5f0e2b7c9a1d4e3f8b6a0c2d", TOOL_NAME, TOOL_ARGS)  # OpenAI-style id
CALLED = (  # the user asked, the model called, the function answered
    t.Message("user", audio=AUDIO),
    t.Message("assistant", tool_calls=(CALL,)),
    t.Message("tool", '{"sky": "clear", "temperature": 21}', call_id=CALL.call_id),
)


def final(engine: VoxtralEngine, request: t.Request) -> tuple[list[str], t.Totals]:
    chunks = list(engine.stream(request))
    assert chunks[-1].totals is not None
    return [c.text for c in chunks[:-1]], chunks[-1].totals


def prompt_ids(engine: VoxtralEngine, request: t.Request) -> list[int]:
    ids: list[int] = engine.model_inputs(request)["input_ids"][0].tolist()
    return ids


def decoded(engine: VoxtralEngine, ids: list[int]) -> str:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    mistral = engine.processor.tokenizer.tokenizer
    text: str = mistral.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)
    return text


def mistral_audio(audio: np.ndarray) -> AudioChunk:
    return AudioChunk.from_audio(Audio.from_bytes(wav_bytes(audio)))


def mistral_tool(tool: t.Tool) -> Tool:
    return Tool(
        function=Function(name=tool.name, description=tool.description, parameters=tool.parameters)
    )


# --------------------------------------------------------------------------- the prompt


def test_a_multi_step_conversation_is_encoded_as_mistral_common_encodes_it(
    tool_engine: VoxtralEngine,
) -> None:
    """user audio -> call -> result -> answer -> a new spoken question, tools offered."""
    answer = "It is sunny and 21 degrees."
    history = (*CALLED, t.Message("assistant", answer))
    question = speech_like(0.8, seed=3)
    request = t.Request(question, history=history, tools=(WEATHER, CLOCK))

    call_id = mistral_call_id(CALL.call_id)
    expected = ChatCompletionRequest(
        messages=[
            UserMessage(content=[mistral_audio(AUDIO)]),
            AssistantMessage(
                tool_calls=[
                    ToolCall(id=call_id, function=FunctionCall(name=TOOL_NAME, arguments=TOOL_ARGS))
                ]
            ),
            ToolMessage(content=CALLED[2].text, tool_call_id=call_id),
            AssistantMessage(content=answer),
            UserMessage(content=[mistral_audio(question)]),
        ],
        tools=[mistral_tool(WEATHER), mistral_tool(CLOCK)],
    )
    tokenizer = tool_engine.processor.tokenizer.tokenizer
    ids = prompt_ids(tool_engine, request)
    assert ids == tokenizer.encode_chat_completion(expected).tokens

    text = decoded(tool_engine, ids).replace("[AUDIO]", "")
    # The call and its result stay in the history; the tools are offered before the last
    # user turn only.
    call = f'[{{"name": "{TOOL_NAME}", "arguments": {TOOL_ARGS}, "id": "{call_id}"}}]'
    assert f"[/INST][TOOL_CALLS]{call}</s>" in text
    assert f"[TOOL_RESULTS]{call_id}[TOOL_CONTENT]{CALLED[2].text}[/TOOL_RESULTS]" in text
    assert text.count("[AVAILABLE_TOOLS]") == 1
    assert text.index("[AVAILABLE_TOOLS]") > text.index(answer)
    assert text.endswith("[/AVAILABLE_TOOLS][INST][BEGIN_AUDIO][/INST]")


def test_openai_call_ids_become_the_nine_characters_mistral_requires_the_same_each_time() -> None:
    ids = {mistral_call_id(f"call_{i:024x}") for i in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 9 and i.isalnum() and i.isascii() for i in ids)
    assert mistral_call_id(CALL.call_id) == mistral_call_id(CALL.call_id)
    assert mistral_call_id("abcDEF123") == "abcDEF123"  # already one: kept


def test_tool_choice_none_offers_no_tools_and_a_name_offers_only_that_tool(
    tool_engine: VoxtralEngine,
) -> None:
    tools = (WEATHER, CLOCK)
    offered_all = decoded(tool_engine, prompt_ids(tool_engine, t.Request(AUDIO, tools=tools)))
    assert '"get_weather"' in offered_all and '"get_time"' in offered_all
    none = t.Request(AUDIO, tools=tools, tool_choice="none")
    assert "[AVAILABLE_TOOLS]" not in decoded(tool_engine, prompt_ids(tool_engine, none))
    assert prompt_ids(tool_engine, none) == prompt_ids(tool_engine, t.Request(AUDIO))
    named = decoded(
        tool_engine, prompt_ids(tool_engine, t.Request(AUDIO, tools=tools, tool_choice="get_time"))
    )
    assert '"get_time"' in named and '"get_weather"' not in named


@pytest.mark.parametrize(
    ("tools", "choice", "code", "words"),
    [
        ((WEATHER,), "get_time", "invalid_tool_choice", "get_time"),
        ((), "required", "invalid_tool_choice", "no tools"),
        ((WEATHER, WEATHER), "auto", "invalid_tools", "share a name"),
        ((t.Tool("get weather"),), "auto", "invalid_tools", "'get weather'"),
    ],
)
def test_tools_or_a_choice_the_model_cannot_be_given_are_refused_at_submit(
    tool_engine: VoxtralEngine, tools: tuple[t.Tool, ...], choice: str, code: str, words: str
) -> None:
    with pytest.raises(t.EngineError) as caught:
        tool_engine.submit(t.Request(AUDIO, tools=tools, tool_choice=choice), lambda c: None)
    assert caught.value.code == code and words in str(caught.value)
    assert final(tool_engine, t.Request(AUDIO, tools=(WEATHER,)))[1].status == "completed"


def test_a_result_that_came_after_the_user_spoke_again_is_read_right_after_its_call() -> None:
    later = t.Message("user", "Also, what time is it?")
    messages = chat_messages(t.Request(None, history=(*CALLED[:2], later, CALLED[2])))
    assert [m.role for m in messages] == ["user", "assistant", "tool", "user"]
    assert messages[2] is CALLED[2] and messages[3] is later


def test_a_call_whose_result_never_came_is_left_out_of_the_prompt(
    tool_engine: VoxtralEngine,
) -> None:
    history = (*CALLED[:2], t.Message("user", "Never mind."))
    messages = chat_messages(t.Request(None, history=history, tools=(WEATHER,)))
    assert [m.role for m in messages] == ["user", "user"]
    _, totals = final(tool_engine, t.Request(None, history=history, tools=(WEATHER,)))
    assert totals.status == "completed"


def test_words_then_a_call_are_one_assistant_turn_as_the_model_said_them() -> None:
    words = t.Message("assistant", "Let me check.")
    messages = chat_messages(t.Request(None, history=(CALLED[0], words, *CALLED[1:])))
    assert [m.role for m in messages] == ["user", "assistant", "tool"]
    assert messages[1].text == "Let me check." and messages[1].tool_calls == (CALL,)


def test_a_result_for_no_call_is_refused_at_submit(tool_engine: VoxtralEngine) -> None:
    stray = t.Message("tool", "42", call_id="call_nobody")
    with pytest.raises(t.EngineError, match="call_nobody") as caught:
        tool_engine.submit(t.Request(AUDIO, history=(stray,)), lambda c: None)
    assert caught.value.code == "invalid_conversation"


def test_a_system_message_in_a_spoken_conversation_joins_the_next_user_turn(
    tool_engine: VoxtralEngine,
) -> None:
    """Voxtral's format refuses a system prompt beside audio; its words still reach the model."""
    system = t.Message("system", "Answer in one sentence.")
    request = t.Request(AUDIO, history=(system,), instructions="Be kind.", tools=(WEATHER,))
    text = decoded(tool_engine, prompt_ids(tool_engine, request)).replace("[AUDIO]", "")
    assert "[SYSTEM_PROMPT]" not in text
    assert text.endswith("[INST][BEGIN_AUDIO]Answer in one sentence.\n\nBe kind.[/INST]")
    assert final(tool_engine, request)[1].tool_calls[0].name == TOOL_NAME
    texts_only = t.Request(None, history=(system, t.Message("user", "Hi")))
    assert "[SYSTEM_PROMPT]" in decoded(tool_engine, prompt_ids(tool_engine, texts_only))


# --------------------------------------------------------------------------- the calls


def test_the_scripted_model_calls_its_function_and_says_no_words(
    tool_engine: VoxtralEngine,
) -> None:
    texts, totals = final(tool_engine, t.Request(AUDIO, tools=(CLOCK, WEATHER)))
    assert totals.status == "completed" and totals.error_code is None
    assert texts == [] and totals.answer == ""
    (call,) = totals.tool_calls
    assert call.name == TOOL_NAME
    assert json.loads(call.arguments) == json.loads(TOOL_ARGS)
    assert call.call_id.startswith("call_") and len(call.call_id) == 5 + 24
    again = final(tool_engine, t.Request(AUDIO, tools=(WEATHER,)))[1].tool_calls[0]
    assert again.call_id != call.call_id  # a fresh id for every call


def test_after_the_functions_result_the_model_answers_in_words(
    tool_engine: VoxtralEngine,
) -> None:
    texts, totals = final(tool_engine, t.Request(None, history=CALLED, tools=(WEATHER,)))
    assert totals.status == "completed" and totals.tool_calls == ()
    assert "".join(texts) == totals.answer == TOOL_ANSWER


def test_without_tools_the_model_calls_nothing(tool_engine: VoxtralEngine) -> None:
    for request in (t.Request(AUDIO), t.Request(AUDIO, tools=(WEATHER,), tool_choice="none")):
        texts, totals = final(tool_engine, replace(request, max_new_tokens=24))
        assert totals.status == "completed" and totals.tool_calls == ()
        assert tool_engine.prompts.tool_calls_token not in totals.token_ids
        assert "".join(texts) == totals.answer


def test_a_call_of_a_tool_not_offered_ends_with_invalid_tool_call(
    tool_engine: VoxtralEngine,
) -> None:
    texts, totals = final(tool_engine, t.Request(AUDIO, tools=(CLOCK,)))
    assert totals.status == "error" and totals.error_code == "invalid_tool_call"
    assert totals.error is not None and TOOL_NAME in totals.error and "get_time" in totals.error
    assert texts == [] and totals.tool_calls == ()


def test_a_required_call_comes_first_and_malformed_json_is_invalid_tool_call(
    scripted_engine: VoxtralEngine,
) -> None:
    """The text-scripted model, made to call, writes no JSON: the answer is an error quoting
    what it wrote, not words."""
    request = t.Request(AUDIO, tools=(WEATHER,), tool_choice="required", max_new_tokens=40)
    texts, totals = final(scripted_engine, request)
    assert totals.token_ids[0] == scripted_engine.prompts.tool_calls_token
    assert totals.status == "error" and totals.error_code == "invalid_tool_call"
    assert totals.error is not None and "not JSON" in totals.error
    written = scripted_engine.processor.tokenizer.decode(
        list(totals.token_ids[1:]), skip_special_tokens=True
    )
    assert written[:40] in totals.error and len(totals.error) < 400  # quoted, truncated
    assert texts == [] and totals.tool_calls == ()
    # Without tools the same model says its script, as before.
    assert final(scripted_engine, t.Request(AUDIO))[1].answer == SCRIPT


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ('[{"name": "get_weather", "arguments": {"city": "Par', "not JSON"),
        ('[{"name": "get_weather", "arguments": [1]}]', "not a JSON object"),
        ('[{"arguments": {}}]', '{"name", "arguments"}'),
        ("[]", '{"name", "arguments"}'),
        ('[{"name": "get_weather", "arguments": "{oops"}]', "not JSON"),
    ],
)
def test_what_the_model_wrote_must_be_calls_of_offered_tools(written: str, problem: str) -> None:
    with pytest.raises(t.EngineError) as caught:
        parse_mistral(written, (WEATHER,), set())
    assert caught.value.code == "invalid_tool_call" and problem in str(caught.value)


def test_a_call_keeps_the_models_id_unless_the_conversation_holds_it() -> None:
    with_id = '[{"name": "get_weather", "arguments": {}, "id": "abc123xyz"}]'
    (kept,) = parse_mistral(with_id, (WEATHER,), set())
    assert kept.call_id == "abc123xyz" and kept.arguments == "{}"
    (fresh,) = parse_mistral(with_id, (WEATHER,), {"abc123xyz"})
    assert fresh.call_id.startswith("call_")
    # An id copied from the prompt's history (where ids are Mistral's) is not reused either.
    copied = json.dumps([{"name": TOOL_NAME, "arguments": {}, "id": mistral_call_id(CALL.call_id)}])
    (fresh,) = parse_mistral(copied, (WEATHER,), call_ids(CALLED))
    assert fresh.call_id.startswith("call_")
    two = parse_mistral(
        json.dumps([{"name": TOOL_NAME, "arguments": {"city": c}} for c in ("Oslo", "Rome")]),
        (WEATHER,),
        set(),
    )
    assert [json.loads(c.arguments)["city"] for c in two] == ["Oslo", "Rome"]
    assert two[0].call_id != two[1].call_id


def test_make_tiny_script_tool_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    run = cli("make-tiny", str(out), "--script-tool", "lookup", '{"q": "x"}')
    assert run.returncode == 0, run.stderr
    bad = cli("make-tiny", str(tmp_path / "bad"), "--script-tool", "lookup", "{not json")
    assert bad.returncode == 2 and "not JSON" in bad.stderr


# --------------------------------------------------------------------------- vLLM


@pytest.fixture
def fake_vllm() -> Iterator[FakeVllm]:
    fake = FakeVllm()
    fake.server = InProcessServer(fake.app()).start(wait_loaded=False)
    yield fake
    fake.release()
    fake.server.stop()


def vllm_turn(fake: FakeVllm, request: t.Request) -> t.Totals:
    engine = VllmEngine.load(vllm_settings([fake.url]))
    try:
        collector = Collector()
        engine.submit(request, collector)
        totals = collector.final().totals
    finally:
        engine.close()
    assert totals is not None
    return totals


def call_deltas(
    name: str, arguments: str, call_id: str = "Ab3dE6gH9"
) -> list[str | dict[str, object]]:
    """How vLLM's mistral tool parser streams one call: id and name, then argument pieces."""
    head = {
        "index": 0,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    pieces = [arguments[:10], arguments[10:]]
    return [
        {"tool_calls": [head]},
        *({"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces),
    ]


def test_vllm_is_offered_the_tools_and_its_streamed_call_becomes_the_answer(
    fake_vllm: FakeVllm,
) -> None:
    fake_vllm.deltas = call_deltas(TOOL_NAME, TOOL_ARGS)
    request = t.Request(None, history=CALLED[:1], tools=(WEATHER, CLOCK), tool_choice=TOOL_NAME)
    totals = vllm_turn(fake_vllm, request)
    assert totals.status == "completed" and totals.answer == ""
    assert totals.tool_calls == (t.ToolCall("Ab3dE6gH9", TOOL_NAME, TOOL_ARGS),)

    body = fake_vllm.requests[-1]["body"]
    assert [tool["function"]["name"] for tool in body["tools"]] == [TOOL_NAME]
    assert body["tool_choice"] == {"type": "function", "function": {"name": TOOL_NAME}}


def test_vllm_gets_the_call_and_its_result_with_mistral_ids_and_no_tools_for_none(
    fake_vllm: FakeVllm,
) -> None:
    request = t.Request(None, history=CALLED, tools=(WEATHER,), tool_choice="none")
    assert vllm_turn(fake_vllm, request).answer == "Hello from fake."
    body = fake_vllm.requests[-1]["body"]
    assert "tools" not in body and "tool_choice" not in body
    call_id = mistral_call_id(CALL.call_id)
    assert body["messages"][1]["tool_calls"][0]["id"] == call_id
    assert body["messages"][2] == {
        "role": "tool",
        "tool_call_id": call_id,
        "content": CALLED[2].text,
    }
    assert offered_tools(request) == ()


def test_vllm_call_with_broken_arguments_is_invalid_tool_call(fake_vllm: FakeVllm) -> None:
    fake_vllm.deltas = call_deltas(TOOL_NAME, '{"city": ')
    totals = vllm_turn(fake_vllm, t.Request(AUDIO, tools=(WEATHER,)))
    assert totals.status == "error" and totals.error_code == "invalid_tool_call"
    assert '{"city": ' in (totals.error or "") and totals.tool_calls == ()


def test_vllm_call_cut_off_at_the_token_limit_is_invalid_tool_call(fake_vllm: FakeVllm) -> None:
    """Seen with real vLLM: a forced call's name came, then `finish_reason: length` before
    any argument."""
    fake_vllm.deltas = [*call_deltas(TOOL_NAME, "")[:1], {"content": None}]
    fake_vllm.finish_reason = "length"
    totals = vllm_turn(fake_vllm, t.Request(AUDIO, tools=(WEATHER,), tool_choice="required"))
    assert totals.status == "error" and totals.error_code == "invalid_tool_call"
    assert "token limit" in (totals.error or "") and TOOL_NAME in (totals.error or "")


def test_vllm_required_call_with_nothing_before_the_token_limit_says_so(
    fake_vllm: FakeVllm,
) -> None:
    """Seen with real vLLM too: nothing of a required call came before `length`."""
    fake_vllm.deltas = [{"content": ""}]
    fake_vllm.finish_reason = "length"
    totals = vllm_turn(fake_vllm, t.Request(AUDIO, tools=(WEATHER,), tool_choice="required"))
    assert totals.error_code == "invalid_tool_call" and "token limit" in (totals.error or "")


def test_vllm_answering_in_words_when_a_call_is_required_is_invalid_tool_call(
    fake_vllm: FakeVllm,
) -> None:
    totals = vllm_turn(fake_vllm, t.Request(AUDIO, tools=(WEATHER,), tool_choice="required"))
    assert totals.status == "error" and totals.error_code == "invalid_tool_call"
    assert "Hello from fake." in (totals.error or "")
