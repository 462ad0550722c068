"""Hypothesis strategies for client events: random JSON, valid events, and valid events mutated.

Used by `test_fuzz.py`. Three families, from least to most plausible:

- `random_json()`: any JSON value (unicode with lone surrogates, NaN and infinities, huge and
  negative numbers, nesting), serialised in several ways (ASCII or not, text or bytes);
- `valid_events()`: one well-formed event of every client type the server supports, every
  field drawn from its valid range;
- `mutated_events()`: a valid event with one to three of: a key dropped, renamed or added, a
  value of another type or an extreme one, a wrong `type`, broken base64 / odd-length PCM16,
  a very long string; plus raw text that is not JSON (truncated, trailing garbage, deep
  nesting, huge integers) and raw bytes.

A value may hold `LAST_RESPONSE`, which `encode()` turns into the id of the last response the
session announced (so `response.cancel` and `voxtral.client_timing` can name a real one).
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from voxtral_server.api import protocol as p


class _LastResponse:
    """Placeholder for the id of the response the session announced last."""

    def __repr__(self) -> str:
        return "LAST_RESPONSE"


LAST_RESPONSE = _LastResponse()

# ------------------------------------------------------------------ scalars

# Lone surrogates (category Cs) are what UTF-8 cannot carry; st.text() leaves them out.
_CHARS = st.one_of(st.characters(), st.characters(categories=["Cs"]))
TEXT = st.text(_CHARS, max_size=40)
_EXTREME_NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1, -(2**63), 2**63, 2**64 + 1, 1e308, -1e308, 5e-324, -0.0]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    # Huge integers, built (a 4000-digit literal would fill every repr of these strategies);
    # JSON text over 4300 digits is in _not_json().
    st.sampled_from([20, 300, 4000]).map(lambda digits: 10**digits),
)
NUMBERS = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    _EXTREME_NUMBERS,
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)


def random_json(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Any JSON value (NaN and infinities included, as Python's json module writes them)."""
    return st.recursive(
        SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(TEXT, children, max_size=5),
        ),
        max_leaves=max_leaves,
    )


# Very long strings, built rather than drawn (drawing 300k characters is slow). With the
# default server.max_event_bytes (1 MiB) some fit, "😀" x 300k (1.2 MB) does not.
LONG_STRINGS = st.builds(
    lambda char, n: char * n,
    st.sampled_from(["a", "é", "\ud800", "😀", "\x00", "\\", '"']),
    st.sampled_from([1000, 5000, 70_000, 300_000]),
)

# ------------------------------------------------------------------ valid events

LANGUAGES = ("en", "fr", "de", "es", "it", "pt", "nl", "hi")


# Up to 200 ms of PCM16 at 16 kHz (an even number of bytes: whole samples).
PCM16 = st.binary(max_size=6400).map(lambda b: b[: len(b) // 2 * 2])


@st.composite
def _optional_fields(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """Some of `fields` (each present or not), drawn."""
    return {k: draw(v) for k, v in fields.items() if draw(st.booleans())}


def turn_detection() -> st.SearchStrategy[dict[str, Any] | None]:
    return st.one_of(
        st.none(),  # push-to-talk
        _optional_fields(
            {
                "type": st.sampled_from(["server_vad", "semantic_vad"]),
                "threshold": st.floats(0.01, 0.99),
                "prefix_padding_ms": st.integers(0, 5000),
                "silence_duration_ms": st.integers(32, 10_000),
                "create_response": st.booleans(),
                "interrupt_response": st.booleans(),
            }
        ),
    )


def audio_format() -> st.SearchStrategy[dict[str, Any]]:
    """Formats the server takes, and ones it must refuse by name."""
    return _optional_fields(
        {
            "type": st.sampled_from(["audio/pcm", "audio/pcmu", "audio/pcma", "audio/opus"]),
            "rate": st.sampled_from([24000, 16000, 8000, 44100, 0, -1]),
        }
    )


def session_config() -> st.SearchStrategy[dict[str, Any]]:
    audio_input = _optional_fields(
        {
            "format": audio_format(),
            "turn_detection": turn_detection(),
            "transcription": _optional_fields({"language": st.sampled_from(LANGUAGES)}),
        }
    )
    audio_output = _optional_fields({"format": audio_format()})
    return _optional_fields(
        {
            "type": st.sampled_from(["realtime", "transcription"]),
            "instructions": st.one_of(st.none(), st.text(max_size=200)),
            "audio": _optional_fields({"input": audio_input, "output": audio_output}),
        }
    )


def _event(type_: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"type": st.just(type_), **fields},
        optional={"event_id": st.text(max_size=20)},
    )


RESPONSE_IDS = st.one_of(st.just(LAST_RESPONSE), st.text(max_size=64))
TIMING_MS = st.floats(0, 600_000)


def valid_events() -> st.SearchStrategy[dict[str, Any]]:
    """One well-formed client event of any supported type."""
    return st.one_of(
        _event("session.update", session=session_config()),
        _event(
            "input_audio_buffer.append", audio=PCM16.map(lambda b: base64.b64encode(b).decode())
        ),
        _event("input_audio_buffer.commit"),
        _event("input_audio_buffer.clear"),
        _event("response.create"),
        _event("response.cancel"),
        _event("response.cancel", response_id=RESPONSE_IDS),
        _event("voxtral.client_timing", response_id=RESPONSE_IDS, first_word_ms=TIMING_MS),
        _event(
            "voxtral.client_timing",
            response_id=RESPONSE_IDS,
            first_word_ms=st.one_of(st.none(), TIMING_MS),
            first_audio_ms=st.one_of(st.none(), TIMING_MS),
        ),
        _event("voxtral.fallback", reason=st.text(max_size=300)),
    )


# ------------------------------------------------------------------ mutations


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside `value` (dict keys and list indexes), `()` included."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


def _set(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """`value` with the item at `path` replaced (copies along the path)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _set(value[head], rest, new)}
    copy = list(value)
    copy[head] = _set(copy[head], rest, new)
    return copy


def _containers(event: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [path for path in _paths(event) if isinstance(_get(event, path), dict)]


BAD_BASE64 = st.one_of(
    st.sampled_from(
        [
            "",
            "A",  # one character: not base64
            "AA==",  # one byte: odd-length PCM16
            "AAA=",  # two bytes: one sample
            "AAAA====",
            "====",
            "AA AA",
            "AA\nAA",
            "-_-_",  # urlsafe alphabet
            "data:audio/pcm;base64,AAAA",
            "\ud800\ud800\ud800\ud800",
            "AAAAAAAA" * 5000,  # 30000 zero samples
        ]
    ),
    st.binary(max_size=101).map(lambda b: base64.b64encode(b).decode()),  # odd lengths too
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode().rstrip("=")),
    TEXT,
)
# NaN and infinity are what float32 audio from other sources could carry; PCM16 cannot.
EXTREMES = st.one_of(
    _EXTREME_NUMBERS,
    st.sampled_from(["", " ", "null", "0", "true", [], {}, [[]], None, True, False]),
    LONG_STRINGS,
)
TYPE_NAMES = st.one_of(
    st.sampled_from(p.CLIENT_EVENT_TYPES),
    st.sampled_from(p.CLIENT_EVENT_TYPES).map(str.upper),
    st.sampled_from(p.CLIENT_EVENT_TYPES).map(lambda t: f" {t}"),
    st.sampled_from(
        [
            "",
            "session.created",
            "conversation.item.create",
            "response.done",
            "error",
            "input_audio_buffer",
            "voxtral.",
            "transcription_session.update",
        ]
    ),
    TEXT,
    LONG_STRINGS,
)


@st.composite
def _mutation(draw: st.DrawFn, event: dict[str, Any]) -> Any:
    """`event` changed in one way."""
    paths = [path for path in _paths(event) if path]
    kind = draw(
        st.sampled_from(
            ["drop", "rename", "retype", "extreme", "extra", "type", "audio", "wrap"]
            if paths
            else ["extra", "type", "wrap"]
        )
    )
    if kind in ("drop", "rename"):
        path = draw(st.sampled_from(paths))
        parent = _get(event, path[:-1])
        if isinstance(parent, dict):
            value = parent[path[-1]]
            rest = {k: v for k, v in parent.items() if k != path[-1]}
            if kind == "rename":
                rest[draw(st.one_of(TEXT, st.just(str(path[-1]).upper())))] = value
            return _set(event, path[:-1], rest)
        return _set(event, path[:-1], [v for i, v in enumerate(parent) if i != path[-1]])
    if kind == "retype":
        return _set(event, draw(st.sampled_from(paths)), draw(random_json(max_leaves=5)))
    if kind == "extreme":
        return _set(event, draw(st.sampled_from(paths)), draw(EXTREMES))
    if kind == "extra":
        where = draw(st.sampled_from(_containers(event)))
        extra = {**_get(event, where), draw(TEXT): draw(random_json(max_leaves=5))}
        return _set(event, where, extra)
    if kind == "type":
        return {**event, "type": draw(TYPE_NAMES)}
    if kind == "audio":
        return {**event, "type": "input_audio_buffer.append", "audio": draw(BAD_BASE64)}
    # "wrap": the event put inside another value (a batch, a payload field).
    return draw(st.sampled_from([[event], {"event": event}, {"type": event}]))


@st.composite
def mutated_events(draw: st.DrawFn) -> Any:
    """A valid event changed in one to three ways (the result may happen to be valid)."""
    event: Any = draw(valid_events())
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(event, dict):
            break
        event = draw(_mutation(event))
    return event


# ------------------------------------------------------------------ on the wire


@dataclass(frozen=True)
class Json:
    """A value to send as JSON text (or bytes), serialised when sent."""

    value: Any
    ensure_ascii: bool = True
    as_bytes: bool = False


@dataclass(frozen=True)
class Raw:
    """Text or bytes sent as they are."""

    data: str | bytes


Message = Json | Raw


def _dumps(value: Any, last_response: str | None = None, ensure_ascii: bool = True) -> str:
    def placeholder(o: Any) -> Any:
        if o is LAST_RESPONSE:
            return last_response or "resp_none"
        raise TypeError(f"not JSON: {o!r}")

    return json.dumps(value, ensure_ascii=ensure_ascii, default=placeholder)


def encode(message: Message, last_response: str | None) -> str | bytes:
    """What the transport hands the session for `message`."""
    if isinstance(message, Raw):
        return message.data

    text = _dumps(message.value, last_response, message.ensure_ascii)
    # "surrogatepass": bytes that hold a lone surrogate are not UTF-8, as a hostile client's.
    return text.encode("utf-8", "surrogatepass") if message.as_bytes else text


def _json(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Message]:
    return st.builds(Json, values, st.booleans(), st.sampled_from([False, False, True]))


def _not_json() -> st.SearchStrategy[Raw]:
    deep = st.builds(
        lambda opener, n: opener * n,
        st.sampled_from(["[", '{"a":', '{"type":"session.update","session":{"x":[']),
        st.sampled_from([50, 1000, 100_000]),
    )
    nested_closed = st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
    return st.one_of(
        st.builds(Raw, st.text(_CHARS, max_size=60)),
        st.builds(Raw, st.binary(max_size=60)),
        st.builds(Raw, deep),
        st.builds(Raw, nested_closed),
        st.builds(Raw, st.integers(4000, 6000).map(lambda n: "1" * n)),  # past int digits limit
        st.builds(Raw, st.sampled_from(["", " ", "null", "NaN", "[]", "{}", '"type"', "\ufeff{}"])),
        st.builds(lambda event, cut: Raw(_dumps(event)[:cut]), valid_events(), st.integers(0, 40)),
        st.builds(
            lambda event, tail: Raw(_dumps(event) + tail),
            valid_events(),
            st.sampled_from(["x", "}", "{}", "\x00", " // comment"]),
        ),
        st.builds(
            lambda event, codec: Raw(_dumps(event).encode(codec)),
            valid_events(),
            st.sampled_from(["utf-16", "utf-32", "utf-8-sig", "latin-1"]),
        ),
    )


def any_message() -> st.SearchStrategy[Message]:
    """One client message, each family as likely: for the parser, where a message is cheap."""
    return st.one_of(
        _json(valid_events()),
        _json(mutated_events()),
        _json(random_json()),
        _not_json(),
    )


@st.composite
def messages(draw: st.DrawFn) -> Message:
    """One client message: valid or mutated events mostly, some random JSON or not JSON."""
    roll = draw(st.integers(0, 19))  # shrinks towards a valid event
    if roll < 8:
        return draw(_json(valid_events()))
    if roll < 15:
        return draw(_json(mutated_events()))
    if roll < 17:
        return draw(_json(random_json()))
    return draw(_not_json())
