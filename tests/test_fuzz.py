"""Fuzzing client events: the parser, then a session, each followed by a normal turn.

Strategies live in `fuzz_events.py` (random JSON, valid events of every type, mutated ones,
raw text and bytes). Two levels:

1. `protocol.parse_client_event` returns an event or raises `ProtocolError` with a known code
   and a message that reaches the client (UTF-8 on the wire); never anything else.
2. A `Session` over the real tiny scripted engine takes a sequence of such messages (with
   waits for the running answer and the test clip spoken, for server VAD); no exception
   escapes, not even from a callback on the loop; every event it sends is JSON a UTF-8 wire
   can carry; every `error` has a documented code and a message; every response.created
   gets its response.done; and then the same session completes a push-to-talk turn whose
   words are the scripted answer.

The runs are derandomized (the same examples every time, no example database), so CI is
reproducible. The default is sized for `make test` (level 2: 80 sequences, each ending in a
real turn; level 1: ten times as many messages). A longer soak run:

    VOXTRAL_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz.py

sets the level-2 count (level 1 gets ten times as many). Each example's coroutine runs on its
own event loop (`asyncio.run`); the session-scoped engine is thread-based and hands chunks to
whichever loop submitted the request.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import SAMPLE_WAV, SCRIPT
from fakes import FakeTransport, frames
from fuzz_events import (
    SCALARS,
    TEXT,
    Json,
    Message,
    any_message,
    encode,
    messages,
    valid_events,
)
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from wire import append_event, session_update

from voxtral_server.api import protocol as p
from voxtral_server.api.metrics import Metrics
from voxtral_server.api.session import Session
from voxtral_server.config import Settings
from voxtral_server.models.audio import read_audio_file
from voxtral_server.models.vad import VadWorker
from voxtral_server.models.voxtral import VoxtralEngine

EXAMPLES = int(os.environ.get("VOXTRAL_FUZZ_EXAMPLES", "80"))
WAIT_S = 30  # upper bound of any single wait; nothing here sleeps


# Every field name of a client event, at any depth: an "unknown" field must not be one.
_CLIENT_MODELS = (
    p.SessionUpdate,
    p.SessionConfig,
    p.AudioConfig,
    p.AudioInput,
    p.TurnDetection,
    p.Transcription,
    p.InputAudioBufferAppend,
    p.ResponseCancel,
    p.ClientTiming,
    p.ClientFallback,
)
KNOWN_FIELDS = {name for model in _CLIENT_MODELS for name in model.model_fields}


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=True,
        database=None,
        # "explain" reruns a failing example hundreds of times to point at lines: minutes
        # per failure with a real turn in each.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    )


# What the parser may answer, and every code the README documents for an `error` event.
PARSE_CODES = {"invalid_json", "invalid_event", "unknown_event"}
ERROR_CODES = PARSE_CODES | {
    "event_too_large",
    "invalid_audio",
    "binary_not_supported",
    "input_audio_buffer_commit_empty",
    "input_audio_buffer_full",
    "nothing_to_answer",
    "not_in_transcription_session",
    "item_not_found",
    "item_retrieve_invalid_item_id",
    "item_id_exists",
    "previous_item_not_found",
    "invalid_item",
    "unsupported",
    "invalid_content_index",
    "invalid_audio_end_ms",
    "invalid_tools",
    "invalid_tool_choice",
    "conversation_already_has_active_response",
    "response_cancel_not_active",
    "engine_busy",
    "audio_too_long",
    "generation_failed",
    "semantic_vad_unavailable",
    "unsupported_audio_format",
    "output_audio_format_busy",
}


def on_the_wire(event: p.ServerEvent) -> dict[str, Any]:
    """What a client receives: the event's JSON text, which must be UTF-8 encodable."""
    text = event.to_json()
    text.encode("utf-8")  # a WebSocket text frame / data channel string is UTF-8
    data: dict[str, Any] = json.loads(text)
    return data


# ------------------------------------------------------------------ level 1: the parser


def client_event_id(raw: str | bytes) -> str | None:
    """The `event_id` a client put in `raw`, if it is a JSON object with a string one."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    event_id = data.get("event_id") if isinstance(data, dict) else None
    return event_id if isinstance(event_id, str) else None


def parses(raw: str | bytes) -> p.ClientEvent | None:
    """The event, or None after checking the ProtocolError's code and message."""
    try:
        parsed = p.parse_client_event(raw)
    except p.ProtocolError as exc:
        event(f"refused: {exc.code}")  # --hypothesis-show-statistics tells how many
        assert exc.code in PARSE_CODES, exc.code
        assert str(exc), exc.code
        sent = on_the_wire(p.error_event(exc.code, str(exc), exc.event_id))
        assert sent["error"]["message"]
        assert exc.event_id == client_event_id(raw)  # so the client knows which event failed
        return None
    event(f"parsed: {parsed.type}")
    assert parsed.type in p.CLIENT_EVENT_TYPES
    return parsed


@given(any_message())
@fuzz_settings(EXAMPLES * 10)
def test_the_parser_returns_an_event_or_a_protocol_error(message: Message) -> None:
    parses(encode(message, "resp_0123456789ab"))


UNKNOWN_FIELDS = st.dictionaries(TEXT.filter(lambda k: k not in KNOWN_FIELDS), SCALARS, max_size=3)


@given(valid_events(), UNKNOWN_FIELDS, st.booleans(), st.booleans())
@fuzz_settings(EXAMPLES * 2)
def test_every_valid_event_parses_and_unknown_fields_are_ignored(
    valid: dict[str, Any], unknown: dict[str, Any], ascii_only: bool, raw: bool
) -> None:
    # The mutations start from these: they must really be valid. And as the README says,
    # fields this server does not use (an OpenAI client's voice, tools, ...) are ignored.
    message = Json({**unknown, **valid}, ascii_only, raw)
    parsed = parses(encode(message, "resp_0123456789ab"))
    assert parsed is not None and parsed.type == valid["type"]


# ------------------------------------------------------------------ level 2: a session


class WireTransport(FakeTransport):
    """FakeTransport that records what a client would receive after JSON and UTF-8, and any
    event that could not get there (instead of raising in the session: send never raises)."""

    name = "fuzz"

    def __init__(self) -> None:
        super().__init__()
        self.unsendable: list[str] = []

    def send(self, event: p.ServerEvent) -> None:
        try:
            self.events.append(on_the_wire(event))
        except Exception as exc:  # recorded, and the test fails on it at the end
            self.unsendable.append(f"{type(event).__name__}: {exc!r}")
            self.events.append(event.model_dump(exclude_none=True))
        self._changed.set()

    async def wait_until(self, ready: Callable[[], bool], within_s: float = WAIT_S) -> None:
        async def until() -> None:
            while not ready():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), within_s)

    def last_response(self) -> str | None:
        created = self.of("response.created")
        return created[-1]["response"]["id"] if created else None


SPEECH = read_audio_file(SAMPLE_WAV)  # speech 0.3-2.7 s, then 1.3 s of silence


CLIP = [append_event(frame) for frame in frames(SPEECH, ms=100)]
ASK = [
    append_event(SPEECH[: SPEECH.size // 4]),
    '{"type": "input_audio_buffer.commit"}',
    '{"type": "response.create"}',
]
# The normal turn after fuzzing: a realtime session's (a fuzzed step may have made it a
# transcription session), push-to-talk, 16 kHz.
REALTIME_PUSH_TO_TALK = session_update({"type": "realtime"}, turn_detection=None)


@dataclass(frozen=True)
class Send:
    message: Message


@dataclass(frozen=True)
class Settle:
    """If an answer runs: wait for its next word or its end (so a cancel lands mid-answer)."""


@dataclass(frozen=True)
class Speak:
    """The test clip, in 100 ms appends: a turn of its own under server VAD."""


@dataclass(frozen=True)
class Ask:
    """A second of the clip, committed, and response.create: an answer that runs while the
    next steps arrive (whatever the turn detection)."""


Step = Send | Settle | Speak | Ask


@st.composite
def step(draw: st.DrawFn) -> Step:
    """Mostly a message; sometimes a wait, rarely a turn (each costs an answer)."""
    roll = draw(st.integers(0, 19))  # shrinks towards a message
    if roll < 15:
        return Send(draw(messages()))
    if roll < 17:
        return Settle()
    return Speak() if roll < 18 else Ask()


STEPS = st.lists(step(), min_size=1, max_size=12)


async def settle(session: Session, t: WireTransport) -> None:
    if not session.responding:
        return
    seen = len(t.events)
    news = {"response.output_text.delta", "response.done"}
    await t.wait_until(lambda: any(e["type"] in news for e in t.events[seen:]))


async def normal_turn(session: Session, t: WireTransport) -> None:
    """What a client does after anything: push-to-talk, end what runs, clear, say, answer."""
    await session.handle_text(REALTIME_PUSH_TO_TALK)
    while session.responding:  # a server-VAD turn may start once the cancelled one is done
        if session.transcribing:  # a transcription session's run: it ends by itself
            await t.wait_until(lambda: not session.transcribing)
            continue
        ended = len(t.of("response.done"))
        await session.handle_text('{"type": "response.cancel"}')
        await t.wait_for("response.done", ended + 1, WAIT_S)
    errors = len(t.of("error"))
    await session.handle_text('{"type": "input_audio_buffer.clear"}')
    # The clip, or as much as the session's audio.max_utterance_s takes (100 ms per append).
    for raw in CLIP[: int(session.settings.audio.max_utterance_s * 0.75 * 10)]:
        await session.handle_text(raw)
    await session.handle_text('{"type": "input_audio_buffer.commit"}')
    created = len(t.of("response.created"))
    await session.handle_text('{"type": "response.create"}')
    # response.created goes out before response.create returns.
    assert t.of("response.created")[created:], t.of("error")[errors:]
    response_id = t.of("response.created")[created]["response"]["id"]

    def finished() -> list[dict[str, Any]]:
        return [e for e in t.of("response.done") if e["response"]["id"] == response_id]

    await t.wait_until(lambda: bool(finished()))
    assert t.of("error")[errors:] == []
    assert finished()[0]["response"]["status"] == "completed"
    words = [
        e["delta"] for e in t.of("response.output_text.delta") if e["response_id"] == response_id
    ]
    assert "".join(words) == SCRIPT


def server_settings(changes: dict[str, dict[str, Any]]) -> Settings:
    data = Settings().model_dump()
    for section, values in changes.items():
        data[section].update(values)
    return Settings.model_validate(data)


# The defaults, or limits small enough for the steps to reach: a 2 s utterance (the clip
# overflows push-to-talk, and is cut as a monologue under server VAD), 8 KiB events (the
# clip's appends fit), no conversation history.
SETTINGS = st.builds(
    server_settings,
    st.fixed_dictionaries(
        {},
        optional={
            "audio": st.just({"max_utterance_s": 2.0}),
            "server": st.just({"max_event_bytes": 8192}),
            "conversation": st.just({"max_turns": 0}),
        },
    ),
)


async def fuzz_session(
    engine: VoxtralEngine,
    vad_worker: VadWorker,
    metrics: Metrics,
    steps: list[Step],
    settings: Settings,
) -> WireTransport:
    """Run `steps` then a normal turn on one session; check what it sent. Returns it."""
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
    t = WireTransport()
    session = Session(engine, settings, t, metrics=metrics, vad_worker=vad_worker)
    await session.start()
    try:
        for step in steps:
            if isinstance(step, Send):
                await session.handle_text(encode(step.message, t.last_response()))
            elif isinstance(step, Settle):
                await settle(session, t)
            else:
                for raw in CLIP if isinstance(step, Speak) else ASK:
                    await session.handle_text(raw)
        await normal_turn(session, t)
    finally:
        session.close()
        await session.wait_closed()
    assert loop_errors == [], [ctx.get("exception") or ctx["message"] for ctx in loop_errors]
    assert t.unsendable == []
    for error in t.of("error"):
        assert error["error"]["code"] in ERROR_CODES, error
        assert isinstance(error["error"]["message"], str) and error["error"]["message"], error
    created = [e["response"]["id"] for e in t.of("response.created")]
    assert sorted(e["response"]["id"] for e in t.of("response.done")) == sorted(created)
    return t


def what_happened(t: WireTransport) -> set[str]:
    """Labels for --hypothesis-show-statistics: how much of the session the steps reached."""
    labels = {f"error: {e['error']['code']}" for e in t.of("error")}
    labels |= {f"response.done: {e['response']['status']}" for e in t.of("response.done")}
    before = len(t.of("response.created")) - 1
    return labels | {f"responses before the normal turn: {min(before, 3)}{'+' * (before > 3)}"}


@pytest.fixture(scope="module")
def vad_worker() -> Iterator[VadWorker]:
    worker = VadWorker()  # shared by the examples, as the server shares one
    yield worker
    worker.close()


@given(steps=STEPS, limits=SETTINGS)
@fuzz_settings(EXAMPLES)
def test_a_session_survives_fuzzed_events_and_answers_the_next_turn(
    scripted_engine: VoxtralEngine, vad_worker: VadWorker, steps: list[Step], limits: Settings
) -> None:
    run = fuzz_session(scripted_engine, vad_worker, Metrics(), steps, limits)
    transport = asyncio.run(run)
    for label in what_happened(transport):
        event(label)
