"""What a finished turn measured: the engine's totals and the session's clock -> the
`timings` of response.done and the TTFT log record, built once from one set of numbers.

The log line of a turn waits briefly (`logging.client_report_wait_ms`) for the browser's own
measurement (`client_first_word_ms`, `client_first_audio_ms`), then is written exactly once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from ...models.types import Totals, ms_between
from .. import protocol as p
from ..metrics import Metrics, TurnRecord
from .speculation import SpeculationStats


@dataclass
class TurnClock:
    """perf_counter readings of one response, taken as it runs."""

    turn_ended_at: float  # end of speech detected, or commit received
    first_delta_at: float | None = None  # first word handed to the transport
    first_token_at: float | None = None  # the engine's first token (same clock)
    first_chunk_out_at: float | None = None  # the first word left the engine
    first_audio_at: float | None = None  # speech out: first audio frame sent
    how: str = "commit"  # how the turn ended: silence | semantic | limit | commit
    silence_ms: float | None = None  # silence heard after the speech when it ended
    speech_end_at: float | None = None  # the last speech sample arrived
    speculative: bool = False  # the answer is a run started during the pause

    def since_turn_end(self, at: float | None) -> float | None:
        return ms_between(self.turn_ended_at, at) if at is not None else None


def _between(start: float | None, end: float | None) -> float | None:
    return ms_between(start, end) if start is not None and end is not None else None


def timings(clock: TurnClock, totals: Totals, text: str, transport: str, now: float) -> p.Timings:
    """response.done's `timings` for a turn that ended at `now`."""
    return p.Timings(
        queue_wait_ms=totals.queue_wait_ms,
        model_ttft_ms=totals.model_ttft_ms,
        first_word_ms=clock.since_turn_end(clock.first_delta_at),
        total_ms=ms_between(clock.turn_ended_at, now),
        words=len(text.split()),
        tokens=totals.tokens,
        transport=transport,
        first_token_to_delta_ms=_between(clock.first_token_at, clock.first_delta_at),
        delivery_ms=_between(clock.first_chunk_out_at, clock.first_delta_at),
        cancel_latency_ms=totals.cancel_latency_ms,
        ttfa_ms=clock.since_turn_end(clock.first_audio_at),
        end_of_turn=clock.how,
        silence_ms=clock.silence_ms,
        speech_to_first_word_ms=_between(clock.speech_end_at, clock.first_delta_at),
        speculative=clock.speculative,
    )


def record(
    session: str,
    turn: int,
    mode: str,
    status: str,
    t: p.Timings,
    totals: Totals,
    spec: SpeculationStats,
    retracted: int,
) -> TurnRecord:
    """The TTFT log record of a turn, from its timings (the client's fields come later),
    with the speculative runs and answers taken back since the previous one."""
    return TurnRecord(
        session=session,
        turn=turn,
        transport=t.transport,
        mode=mode,
        status=status,
        model_ttft_ms=t.model_ttft_ms,
        first_word_ms=t.first_word_ms,
        client_first_word_ms=None,
        queue_wait_ms=t.queue_wait_ms,
        total_ms=t.total_ms,
        words=t.words,
        tokens=t.tokens,
        tok_s=totals.tokens_per_s or None,
        cancel_latency_ms=t.cancel_latency_ms,
        ttfa_ms=t.ttfa_ms,
        end_of_turn=t.end_of_turn,
        silence_ms=t.silence_ms,
        speech_to_first_word_ms=t.speech_to_first_word_ms,
        speculative="yes" if t.speculative else "no",
        spec_started=spec.started,
        spec_discarded=spec.discarded,
        spec_wasted_ms=round(spec.wasted_ms, 3),
        retracted=retracted,
    )


class TurnLog:
    """Writes each turn's record once, after waiting `wait_s` for the client's report."""

    def __init__(self, metrics: Metrics | None, wait_s: float) -> None:
        self.metrics = metrics
        self.wait_s = wait_s
        self._waiting: tuple[str, TurnRecord, asyncio.TimerHandle] | None = None

    def add(
        self, response_id: str, turn: TurnRecord, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        """Log `turn` once the client reported (or after the wait; at once without a loop)."""
        self.flush()  # a previous turn still waiting for its report goes out first
        if loop is None:
            self._write(turn)
            return
        timer = loop.call_later(self.wait_s, self.flush)
        self._waiting = (response_id, turn, timer)

    def client_report(self, event: p.ClientTiming) -> None:
        if self._waiting is None or self._waiting[0] != event.response_id:
            return  # too late (already logged) or not a response of this session
        turn = self._waiting[1]
        seen = {
            "client_first_word_ms": event.first_word_ms,
            "client_first_audio_ms": event.first_audio_ms,
        }
        updates = {k: round(v, 3) for k, v in seen.items() if v is not None}
        self._waiting[2].cancel()
        self._waiting = None
        self._write(replace(turn, **updates))  # type: ignore[arg-type]

    def flush(self) -> None:
        """Write the waiting turn's line now (idempotent)."""
        if self._waiting is not None:
            _, turn, timer = self._waiting
            timer.cancel()
            self._waiting = None
            self._write(turn)

    def _write(self, turn: TurnRecord) -> None:
        if self.metrics is not None:
            self.metrics.turn(turn)
