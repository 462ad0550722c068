"""The stock OpenAI Realtime clients people build voice agents with, unchanged, against the
real server on loopback: the OpenAI Agents SDK (Python and npm), pipecat, LiveKit Agents and
the npm `openai` SDK over wss://. Each runs a small program (tests/compat/) in its own cached
environment (tests/client_envs.py) and prints what it observed; the tests assert what that
client's user would notice: the answer's words arrive, once, the history or context holds
each message once, and nothing went wrong in the client (no error event, no crash, no
error in its log: these libraries log a dropped or invalid event rather than raise).

The server answers every prompt with SCRIPT (the scripted tiny checkpoint) and speaks it
with espeak-ng, as these clients ask for audio by default. What each client needs from the
server, with file:line in its source, is in docs/compat.md.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from client_envs import AGENTS, LIVEKIT, NODE, PIPECAT
from compat_harness import (
    ClientRun,
    require,
    run_node_client,
    run_python_client,
    words,
    write_speech_24k,
)
from conftest import SCRIPT, TOOL_ANSWER, TOOL_ARGS, TOOL_NAME
from servers import running_server
from tls import self_signed

from voxtral_server.config import Settings
from voxtral_server.models.voxtral import VoxtralEngine

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="install the Debian package espeak-ng"
)

SETTINGS = Settings().with_overrides({("tts", "engine"): "espeak"})
TYPED = "What is the capital of France?"  # what the programs type (tests/compat/*)
ANSWER = words(SCRIPT)


@pytest.fixture(scope="module")
def server(scripted_engine: VoxtralEngine) -> Iterator[str]:
    with running_server(SETTINGS, scripted_engine) as (base_url, _app):
        yield base_url


@pytest.fixture(scope="module")
def tool_server(tool_engine: VoxtralEngine) -> Iterator[str]:
    """The tool-call checkpoint: a user turn is answered by calling TOOL_NAME with
    TOOL_ARGS, the function's result by TOOL_ANSWER."""
    with running_server(SETTINGS, tool_engine) as (base_url, _app):
        yield base_url


@pytest.fixture(scope="module")
def tls_server(
    scripted_engine: VoxtralEngine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """(https base URL, the certificate a client must trust): the server behind TLS with a
    self-signed certificate for 127.0.0.1."""
    cert = self_signed(tmp_path_factory.mktemp("tls"))
    with running_server(SETTINGS, scripted_engine, **cert.uvicorn()) as (base_url, _app):
        yield base_url, cert.cert


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_speech_24k(tmp_path_factory.mktemp("speech") / "speech24k.pcm")


def ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/v1/realtime"


def no_problems(run: ClientRun) -> None:
    assert not run.problems(), run.describe()


def messages(history: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return [item for item in history if item["type"] == "message" and item["role"] == role]


def texts(item: dict[str, Any]) -> str:
    return words(" ".join(part["text"] or "" for part in item["content"]))


def test_openai_agents_python_voice_turn_and_send_message_keep_one_history(
    server: str, speech: Path
) -> None:
    """openai-agents 0.24 `RealtimeRunner` with `model_config={"url": ...}`: the answer to
    speech and to `send_message` each arrive, and the history holds the user's voice item,
    the typed message and the two answers, each once, with the answer's words not doubled
    (the SDK adds text and audio-transcript deltas of one item together)."""
    run = run_python_client(require(AGENTS), "agents_client.py", ws_url(server), str(speech))
    no_problems(run)
    voice = run.turn("voice")["history"]
    assert len(messages(voice, "user")) == 1, run.describe()
    assert [texts(i) for i in messages(voice, "assistant")] == [ANSWER], run.describe()

    history = run.turn("text")["history"]
    users = messages(history, "user")
    assert len(users) == 2, run.describe()
    assert users[0]["item_id"] == messages(voice, "user")[0]["item_id"]
    assert texts(users[1]) == TYPED
    assert [texts(i) for i in messages(history, "assistant")] == [ANSWER, ANSWER], run.describe()
    assert len({item["item_id"] for item in history}) == len(history), run.describe()
    assert [i["role"] for i in history] == ["user", "assistant", "user", "assistant"]


def test_openai_agents_python_runs_the_function_voxtral_called_from_speech(
    tool_server: str, speech: Path
) -> None:
    """openai-agents with a `@function_tool`: the spoken question makes the model call it;
    the SDK runs the function with the model's arguments, sends its result back and the
    model's answer to it arrives; the history holds the user's turn, the call with its
    output, and the answer, each once."""
    run = run_python_client(
        require(AGENTS), "agents_client.py", ws_url(tool_server), str(speech), "tools"
    )
    no_problems(run)
    assert [(t["city"], t["unit"]) for t in run.of("tool_called")] == [("Paris", "celsius")]
    history = run.turn("tool")["history"]
    assert [i["type"] for i in history] == ["message", "function_call", "message"], history
    call = history[1]
    assert (call["name"], json.loads(call["arguments"])) == (TOOL_NAME, json.loads(TOOL_ARGS))
    assert call["output"] == run.of("tool_end")[0]["output"]
    assert [texts(i) for i in messages(history, "assistant")] == [words(TOOL_ANSWER)]


def test_openai_agents_npm_voice_turn_history_and_send_message(server: str, speech: Path) -> None:
    """@openai/agents-realtime 0.20 (`RealtimeSession`, WebSocket transport,
    `connect({url})`): speech is answered, the history shows the user's item and the
    answer, and `sendMessage` adds the typed message and its answer, each once."""
    folder = require(NODE)
    run = run_node_client(folder, "agents_realtime_client.mjs", ws_url(server), str(speech), env={})
    no_problems(run)
    assert [words(e["text"]) for e in run.of("agent_end")] == [ANSWER, ANSWER], run.describe()
    voice = run.turn("voice")["history"]
    assert len(messages(voice, "user")) == 1, run.describe()
    assert [texts(i) for i in messages(voice, "assistant")] == [ANSWER], run.describe()
    history = run.turn("text")["history"]
    assert [i["role"] for i in history] == ["user", "assistant", "user", "assistant"], (
        run.describe()
    )
    assert texts(messages(history, "user")[1]) == TYPED
    assert [texts(i) for i in messages(history, "assistant")] == [ANSWER, ANSWER]


def test_openai_npm_realtime_ws_over_wss(tls_server: tuple[str, Path], speech: Path) -> None:
    """npm openai 6.49 `OpenAIRealtimeWS` always dials wss://: with the server behind TLS
    (the client trusts the certificate through NODE_EXTRA_CA_CERTS) a voice turn in 24 kHz
    PCM and a typed item followed by `response.create` are both answered, in text only, as
    the session asked."""
    base_url, cert = tls_server
    folder = require(NODE)
    run = run_node_client(
        folder,
        "openai_ws_client.mjs",
        base_url + "/v1",
        str(speech),
        env={"NODE_EXTRA_CA_CERTS": str(cert)},
    )
    no_problems(run)
    assert words(run.turn("voice")["text"]) == ANSWER, run.describe()
    assert words(run.turn("text")["text"]) == ANSWER, run.describe()
    assert all(r["status"] == "completed" for r in run.of("response"))
    types = run.server_event_types()
    assert not [t for t in types if t.startswith("response.output_audio")], run.describe()
    session = run.of("session")[0]["session"]  # nothing declared yet: OpenAI's default
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}


def test_pipecat_realtime_service_answers_its_context_and_speech_once(
    server: str, speech: Path
) -> None:
    """pipecat-ai 1.14 `OpenAIRealtimeLLMService` with `base_url` at the server: the
    context's message goes in as a conversation item and is answered, then speech is
    answered (pipecat truncates the played answer when the user speaks); each answer's
    text reaches the pipeline once (pipecat turns both text and audio-transcript deltas
    into LLMTextFrames) and the context records both answers; no server event kills the
    service (pipecat treats any `error` or an event it cannot parse as fatal)."""
    run = run_python_client(require(PIPECAT), "pipecat_client.py", ws_url(server), str(speech))
    no_problems(run)
    assert words(run.turn("context")["text"]) == ANSWER, run.describe()
    assert words(run.turn("voice")["text"]) == ANSWER, run.describe()
    assert all(r["audio_bytes"] > 0 for r in run.of("response")), run.describe()
    context = run.of("context")[0]["messages"]
    answers = [words(str(m.get("content"))) for m in context if m.get("role") == "assistant"]
    assert answers == [ANSWER, ANSWER], run.describe()


def test_livekit_realtime_model_streams_every_delta(server: str, speech: Path) -> None:
    """livekit-plugins-openai 1.8.9 `openai.realtime.RealtimeModel(base_url=...)`: a
    greeting asked for before anyone spoke (`generate_reply(instructions=...)`, how
    LiveKit's quickstart starts) and the answer to speech each stream as one message with
    its text and 24 kHz audio (no delta dropped for an unknown item); a typed message added
    through `update_chat_ctx` is accepted and answered by `generate_reply()`; the remote
    chat context ends with the typed message and the answers."""
    run = run_python_client(require(LIVEKIT), "livekit_client.py", server + "/v1", str(speech))
    no_problems(run)
    for what in ("greeting", "voice", "text"):
        sent = run.turn(what)["messages"]
        assert sent is not None and len(sent) == 1, run.describe()
        assert words(sent[0]["text"]) == ANSWER, run.describe()
        assert sent[0]["audio_bytes"] > 0
        assert sent[0]["modalities"] == ["audio", "text"]
    items = run.of("chat_ctx")[0]["items"]
    assert [words(i["text"]) for i in items if i["role"] == "assistant"] == [ANSWER] * 3
    assert [i["text"] for i in items if i["role"] == "user"][-1] == TYPED, run.describe()
