"""Per-turn timings -> one greppable log line and Prometheus samples.

The log line is a stable format (documented in the README); `parse_line` reads it back and is
what `voxtral-server ttft` uses:

    TTFT session=sess_00000001 turn=1 transport=webrtc mode=chat status=completed
    model_ttft_ms=31.2 first_word_ms=38.9 client_first_word_ms=41.0 queue_wait_ms=0.2
    total_ms=140.3 words=11 tokens=27 tok_s=412.0 cancel_latency_ms=- ttfa_ms=95.1
    client_first_audio_ms=160.4

(one line; fields are only ever added at the end). A value not known is `-` (e.g.
`client_first_word_ms=-` when the client sent no report). This module knows no tensors and
no HTTP; the app owns one `Metrics` object.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, fields

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_LOGGER = "voxtral_server.ttft"
LINE_PREFIX = "TTFT "
EVENTS_LOGGER = "voxtral_server.events"

_log = logging.getLogger(TTFT_LOGGER)
_events = logging.getLogger(EVENTS_LOGGER)

# Latency buckets in seconds: 5 ms .. 10 s.
_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1,
    1.5,
    2,
    3,
    5,
    10,
)


@dataclass(frozen=True)
class TurnRecord:
    session: str
    turn: int
    transport: str
    mode: str
    status: str  # completed | cancelled | failed
    model_ttft_ms: float | None
    first_word_ms: float | None  # server: end of speech / commit -> first delta handed out
    client_first_word_ms: float | None  # browser: end of speech -> first word on screen
    queue_wait_ms: float | None
    total_ms: float | None
    words: int
    tokens: int
    tok_s: float | None
    cancel_latency_ms: float | None = None
    ttfa_ms: float | None = None  # server: end of speech / commit -> first audio frame sent
    client_first_audio_ms: float | None = None  # browser: end of speech -> first audio played
    end_of_turn: str | None = None  # silence | semantic | limit | commit
    silence_ms: float | None = None  # silence heard after the speech when the turn ended
    speech_to_first_word_ms: float | None = None  # last speech sample arrived -> first delta
    speculative: str | None = None  # yes: the answer was started during the pause
    spec_started: int | None = None  # speculative runs since the previous turn's line
    spec_discarded: int | None = None  # ... of which thrown away (the speaker went on)
    spec_wasted_ms: float | None = None  # engine time spent on those
    retracted: int | None = None  # answers taken back since the previous line (revisions)


FIELDS = tuple(f.name for f in fields(TurnRecord))
TIMING_FIELDS = (
    "model_ttft_ms",
    "first_word_ms",
    "client_first_word_ms",
    "queue_wait_ms",
    "total_ms",
    "cancel_latency_ms",
    "tok_s",
    "ttfa_ms",
    "client_first_audio_ms",
    "silence_ms",
    "speech_to_first_word_ms",
    "spec_wasted_ms",
)
_INTS = ("turn", "words", "tokens", "spec_started", "spec_discarded", "retracted")


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_line(record: TurnRecord) -> str:
    return LINE_PREFIX + " ".join(f"{k}={_fmt(v)}" for k, v in asdict(record).items())


# Only lines this server wrote: the record itself, or the record as the CLI's log format
# prints it ("<date> <time> INFO voxtral_server.ttft: TTFT ..."), anchored at the start, so
# text a client got into another log line (quoted there anyway) can never pass as a turn.
_LINE = re.compile(
    r"^(?:\S+ ){0,2}INFO " + re.escape(TTFT_LOGGER) + ": " + LINE_PREFIX + r"(.*)$"
    r"|^" + LINE_PREFIX + r"(.*)$"
)


def parse_line(line: str) -> TurnRecord | None:
    """The TurnRecord of a TTFT log line this server wrote, else None (any other line,
    or one that only looks like ours: an unknown key, a missing field, a bad value)."""
    match = _LINE.match(line.rstrip("\r\n"))
    if match is None:
        return None
    values: dict[str, object] = {}
    try:
        for part in (match.group(1) or match.group(2) or "").split(" "):
            key, sep, raw = part.partition("=")
            if not sep or key not in FIELDS or key in values:
                return None
            if raw == "-":
                values[key] = None
            elif key in _INTS:
                values[key] = int(raw)
            elif key in TIMING_FIELDS:
                values[key] = float(raw)
            else:
                values[key] = raw
        return TurnRecord(**values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def quoted(text: str) -> str:
    """Client-supplied text as it goes into a log line: one JSON string (no newline, no
    control character, no unescaped quote), so it cannot start or fake another record."""
    return json.dumps(text)


class Metrics:
    """Prometheus collectors for this server (one registry, no module globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ["transport"], registry=r, buckets=_BUCKETS)

        self.model_ttft = hist("voxtral_model_ttft_seconds", "Worker start to first token")
        self.first_word = hist(
            "voxtral_first_word_seconds", "End of speech or commit to first delta handed out"
        )
        self.browser_first_word = hist(
            "voxtral_browser_first_word_seconds", "End of speech to first word, browser clock"
        )
        self.queue_wait = hist("voxtral_queue_wait_seconds", "Waiting for the model worker")
        self.total = hist("voxtral_turn_total_seconds", "End of speech or commit to response.done")
        self.cancel_latency = hist("voxtral_cancel_latency_seconds", "Cancel to generation stopped")
        self.ttfa = hist("voxtral_ttfa_seconds", "End of speech or commit to first audio sent")
        self.browser_first_audio = hist(
            "voxtral_browser_first_audio_seconds", "End of speech to first audio played, browser"
        )
        self.turns = Counter("voxtral_turns", "Answered turns", ["status", "transport"], registry=r)
        self.errors = Counter("voxtral_errors", "Error events sent, by code", ["code"], registry=r)
        self.fallbacks = Counter(
            "voxtral_transport_fallbacks", "Clients that fell back from WebRTC", registry=r
        )
        self.speech_to_first_word = hist(
            "voxtral_speech_to_first_word_seconds",
            "Last speech sample arrived to first delta handed out",
        )
        self.turn_ends = Counter(
            "voxtral_turn_ends",
            "How turns ended (silence, semantic, limit, commit)",
            ["how"],
            registry=r,
        )
        self.speculative = Counter(
            "voxtral_speculative_runs",
            "Answers started while the speaker paused, by outcome (started, kept, discarded)",
            ["outcome"],
            registry=r,
        )
        self.speculative_wasted = Counter(
            "voxtral_speculative_wasted_seconds",
            "Engine time spent on discarded runs",
            registry=r,
        )
        self.retractions = Counter(
            "voxtral_turn_retractions",
            "Answers taken back because the speaker went on",
            registry=r,
        )
        self.sessions = Gauge("voxtral_sessions", "Open conversations", registry=r)
        self.queue_depth = Gauge(
            "voxtral_queue_depth", "Requests waiting for the model", registry=r
        )
        # The transformers engine's batched steps (engine.max_batch > 1).
        self.prefill_step_seconds = Histogram(
            "voxtral_prefill_step_seconds",
            "Prompt prefill run between two decode steps (audio encoder + prompt chunks)",
            registry=r,
            buckets=_BUCKETS,
        )
        self.prefill_tokens = Counter(
            "voxtral_prefill_tokens", "Prompt tokens prefilled", registry=r
        )
        self.decode_step_seconds = Histogram(
            "voxtral_decode_step_seconds",
            "One decode step of the running answers",
            registry=r,
            buckets=(0.001, 0.002, 0.005, *_BUCKETS),
        )
        self.decode_batch = Histogram(
            "voxtral_decode_batch_size",
            "Answers advanced by one decode step",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def turn(self, record: TurnRecord) -> None:
        """Exactly once per answered turn: the log line and the samples."""
        _log.info("%s", format_line(record))
        t = record.transport
        for hist, value in (
            (self.model_ttft, record.model_ttft_ms),
            (self.first_word, record.first_word_ms),
            (self.browser_first_word, record.client_first_word_ms),
            (self.queue_wait, record.queue_wait_ms),
            (self.total, record.total_ms),
            (self.cancel_latency, record.cancel_latency_ms),
            (self.ttfa, record.ttfa_ms),
            (self.browser_first_audio, record.client_first_audio_ms),
            (self.speech_to_first_word, record.speech_to_first_word_ms),
        ):
            if value is not None:
                hist.labels(transport=t).observe(value / 1000.0)
        self.turns.labels(status=record.status, transport=t).inc()
        if record.end_of_turn is not None:
            self.turn_ends.labels(how=record.end_of_turn).inc()
        if record.speculative == "yes":
            self.speculative.labels(outcome="kept").inc()
        self.speculative.labels(outcome="started").inc(record.spec_started or 0)
        self.speculative.labels(outcome="discarded").inc(record.spec_discarded or 0)
        self.speculative_wasted.inc((record.spec_wasted_ms or 0) / 1000.0)
        self.retractions.inc(record.retracted or 0)

    def prefill_step(self, seconds: float, tokens: int) -> None:
        """`models.steps.StepObserver`: called on the engine's thread."""
        self.prefill_step_seconds.observe(seconds)
        self.prefill_tokens.inc(tokens)

    def decode_step(self, seconds: float, batch: int) -> None:
        self.decode_step_seconds.observe(seconds)
        self.decode_batch.observe(batch)

    def error(self, session: str, code: str, message: str) -> None:
        _events.warning("ERROR session=%s code=%s message=%s", session, code, quoted(message))
        self.errors.labels(code=code).inc()

    def fallback(self, session: str, reason: str) -> None:
        _events.warning(
            "FALLBACK session=%s transport=websocket reason=%s", session, quoted(reason)
        )
        self.fallbacks.inc()
