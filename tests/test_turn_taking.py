"""Turn-taking: the end of speech found without hangover, answers started during the pause
(kept or discarded unseen), semantic end-of-turn with a judge, and revisions."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SAMPLE_WAV, SCRIPT, engine_settings
from fakes import FakeTransport, frames

from voxtral_server.api.metrics import Metrics, TurnRecord
from voxtral_server.api.session import Session
from voxtral_server.config import Settings
from voxtral_server.models.audio import SAMPLE_RATE, read_audio_file
from voxtral_server.models.turn.worker import JudgeWorker
from voxtral_server.models.types import Chunk, Request
from voxtral_server.models.voxtral import VoxtralEngine

SPEECH = read_audio_file(SAMPLE_WAV)  # speech 0.3-2.65 s, then 1.3 s of silence
LEVEL = np.abs(SPEECH)
LAST_AUDIBLE_MS = np.flatnonzero(LEVEL.max() * 0.01 < LEVEL)[-1] * 1000 / SAMPLE_RATE
SPEECH_END = int(LAST_AUDIBLE_MS * SAMPLE_RATE / 1000)
START = int(0.3 * SAMPLE_RATE)


def silence(ms: int) -> np.ndarray:
    return np.zeros(SAMPLE_RATE * ms // 1000, np.float32)


class Records(Metrics):
    """Metrics that also keep each turn's record (the TTFT log line's fields)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[TurnRecord] = []

    def turn(self, record: TurnRecord) -> None:
        super().turn(record)
        self.records.append(record)


class FixedJudge:
    """A turn judge that always gives `p` and counts what it was asked."""

    name = "fixed"

    def __init__(self, p: float) -> None:
        self.p = p
        self.calls = 0

    def completeness(self, audio: np.ndarray) -> float:
        self.calls += 1
        return self.p


_WORKERS: list[JudgeWorker] = []


@pytest.fixture(autouse=True)
def close_judge_workers() -> Any:
    """Every judge thread a test started is stopped after it."""
    yield
    while _WORKERS:
        worker = _WORKERS.pop()
        worker.close()
        assert not worker._thread.is_alive()


async def open_session(
    engine: VoxtralEngine,
    settings: Settings | None = None,
    judge: Any = None,
    **update: object,
) -> tuple[Session, FakeTransport, Records]:
    transport, metrics = FakeTransport(), Records()
    worker = JudgeWorker(judge) if judge is not None else None
    if worker is not None:
        _WORKERS.append(worker)
    session = Session(engine, settings or Settings(), transport, metrics, judge=worker)
    await session.start()
    if update:
        await session.handle_text(json.dumps({"type": "session.update", "session": update}))
    return session, transport, metrics


def feed(session: Session, audio: np.ndarray) -> None:
    for frame in frames(audio):
        session.append_audio(frame)


def semantic(eagerness: str = "high") -> dict[str, object]:
    return {
        "audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": eagerness}}}
    }


@pytest.mark.asyncio
async def test_speech_stopped_lands_at_the_last_audible_sample(
    scripted_engine: VoxtralEngine,
) -> None:
    """No hangover: Silero's probability stays high for 2-3 frames of silence after the
    last word; the turn's end is placed where the speech was last heard."""
    session, t, _ = await open_session(scripted_engine)
    feed(session, SPEECH)
    stopped = await t.wait_for("input_audio_buffer.speech_stopped")
    assert abs(stopped["audio_end_ms"] - LAST_AUDIBLE_MS) <= 40
    assert stopped["since_speech_end_ms"] >= 0  # where a client puts the end on its clock
    await t.wait_for("response.done")
    session.close()


@pytest.mark.asyncio
async def test_the_answer_started_in_the_pause_is_the_one_sent(
    scripted_engine: VoxtralEngine,
) -> None:
    session, t, metrics = await open_session(scripted_engine)
    feed(session, SPEECH)
    done = await t.wait_for("response.done")
    assert done["response"]["status"] == "completed"
    assert t.of("response.output_text.done")[0]["text"] == SCRIPT
    timings = done["timings"]
    assert timings["speculative"] is True
    assert timings["end_of_turn"] == "silence" and timings["silence_ms"] == 500
    # The words were ready when the turn ended: they go out with the commit.
    assert timings["first_word_ms"] < timings["speech_to_first_word_ms"]
    session.close()
    (record,) = metrics.records
    assert (record.speculative, record.spec_started, record.spec_discarded) == ("yes", 1, 0)
    exposition = metrics.exposition().decode()
    assert 'voxtral_speculative_runs_total{outcome="kept"} 1.0' in exposition


@pytest.mark.asyncio
async def test_a_pause_the_speaker_talks_through_is_never_seen(
    scripted_engine: VoxtralEngine,
) -> None:
    session, t, metrics = await open_session(scripted_engine)
    # Speech, 250 ms of silence (under the 500 ms that end a turn), then speech again.
    feed(session, np.concatenate([SPEECH[: SPEECH_END + 4000], SPEECH[START:]]))
    await t.wait_for("response.done")
    types = t.types()
    assert types.count("response.created") == 1 and types.count("input_audio_buffer.committed") == 1
    assert types.index("input_audio_buffer.committed") < types.index("response.created")
    assert t.of("response.output_text.done")[0]["text"] == SCRIPT
    session.close()
    (record,) = metrics.records
    assert record.spec_started is not None and record.spec_started >= 2
    assert record.spec_discarded == record.spec_started - 1 and record.speculative == "yes"
    assert record.spec_wasted_ms is not None and record.spec_wasted_ms >= 0


def test_a_speculative_run_never_holds_up_a_confirmed_one(tiny_scripted: Path) -> None:
    """The serial worker (engine.max_batch 1): queued behind a running turn, a confirmed
    request goes before a speculative one that was submitted first; a running speculative
    one is stopped for it. (Batched, the speculative one runs in a free slot, or gives its
    slot up: test_batching.py.)"""
    engine = VoxtralEngine.load(engine_settings(tiny_scripted, engine={"max_batch": 1}))
    try:
        _confirmed_goes_first(engine)
    finally:
        engine.close()


def _confirmed_goes_first(scripted_engine: VoxtralEngine) -> None:
    audio = SPEECH[: SPEECH_END + 1600]
    order: list[str] = []
    finals: dict[str, Chunk] = {}
    done = threading.Event()

    def sink(name: str) -> Any:
        def put(chunk: Chunk) -> None:
            if not chunk.is_final and (not order or order[-1] != name):
                order.append(name)
            if chunk.is_final:
                finals[name] = chunk
                if len(finals) == 3:
                    done.set()

        return put

    # Each its own recording, as in a server (picking a confirmed request from behind a
    # speculative one used to compare the two requests' audio and kill the worker).
    scripted_engine.submit(Request(audio.copy()), sink("running"))
    spec = scripted_engine.submit(Request(audio.copy(), speculative=True), sink("speculative"))
    scripted_engine.submit(Request(audio.copy()), sink("confirmed"))
    assert done.wait(120)
    assert finals["confirmed"].totals is not None
    assert finals["confirmed"].totals.status == "completed"
    spec_totals = finals["speculative"].totals
    assert spec_totals is not None
    if spec_totals.status == "cancelled":  # it had started: stopped for the confirmed one
        assert spec.preempted
    else:  # it waited: it ran only after the confirmed one
        assert order.index("confirmed") < order.index("speculative")


@pytest.mark.asyncio
async def test_a_sure_judge_ends_the_turn_before_the_silence_would(
    scripted_engine: VoxtralEngine,
) -> None:
    judge = FixedJudge(0.9)
    session, t, metrics = await open_session(scripted_engine, judge=judge, **semantic("high"))
    feed(session, SPEECH[: SPEECH_END + 8000])  # 500 ms of silence after the speech
    done = await t.wait_for("response.done")
    assert done["response"]["status"] == "completed"
    timings = done["timings"]
    assert timings["end_of_turn"] == "semantic"
    assert 64 <= timings["silence_ms"] < 500  # first asked at the pause (64 ms of silence)
    assert judge.calls >= 1
    session.close()


@pytest.mark.asyncio
async def test_an_unsure_judge_lets_the_longest_wait_end_the_turn(
    scripted_engine: VoxtralEngine,
) -> None:
    judge = FixedJudge(0.05)
    session, t, _ = await open_session(scripted_engine, judge=judge, **semantic("high"))
    feed(session, np.concatenate([SPEECH, silence(1500)]))  # 2.85 s after the speech
    done = await t.wait_for("response.done")
    timings = done["timings"]
    assert (timings["end_of_turn"], timings["silence_ms"]) == ("silence", 2000)
    assert judge.calls >= 1
    session.close()


@pytest.mark.asyncio
async def test_speech_resuming_after_an_early_end_revises_the_turn(
    scripted_engine: VoxtralEngine,
) -> None:
    """The judge ends the turn; the speaker goes on 300 ms later: the answer is taken back
    and the whole utterance is one turn (one item), answered once."""
    session, t, metrics = await open_session(scripted_engine, judge=FixedJudge(0.9), **semantic())
    feed(session, SPEECH[: SPEECH_END + 3200])  # 200 ms of silence: the judge ends it
    first = await t.wait_for("input_audio_buffer.committed")
    feed(session, np.concatenate([silence(100), SPEECH[START:]]))  # and on he goes
    await t.wait_for("input_audio_buffer.committed", count=2)
    done = await t.wait_for("response.done", count=2)
    assert t.of("conversation.item.deleted") == [
        {**t.of("conversation.item.deleted")[0], "item_id": first["item_id"]}
    ]
    retracted = t.of("response.done")[0]
    assert retracted["response"]["status"] == "cancelled"
    assert retracted["response"]["status_details"]["reason"] == "turn_detected"
    second = t.of("input_audio_buffer.committed")[1]
    assert second["item_id"] == first["item_id"]  # the same user turn, committed again
    assert second.get("previous_item_id") == first.get("previous_item_id")
    assert done["response"]["status"] == "completed"
    assert [m.role for m in session.conversation.history()] == ["user", "assistant"]
    # The revised turn holds both stretches of speech.
    assert session.conversation.history()[0].audio.size > 2 * (SPEECH_END - START)
    assert sum(r.retracted or 0 for r in metrics.records) == 1
    # And the conversation goes on normally.
    feed(session, np.concatenate([silence(1500), SPEECH]))
    third = await t.wait_for("response.done", count=3)
    assert third["response"]["status"] == "completed"
    assert len(session.conversation.history()) == 4  # two exchanges
    session.close()


@pytest.mark.asyncio
async def test_semantic_settings_are_reported_and_checked(scripted_engine: VoxtralEngine) -> None:
    session, t, _ = await open_session(scripted_engine, judge=FixedJudge(0.5), **semantic("low"))
    td = t.of("session.updated")[-1]["session"]["audio"]["input"]["turn_detection"]
    assert td == {
        "type": "semantic_vad",
        "eagerness": "low",
        "create_response": True,
        "interrupt_response": True,
    }
    bad = {"audio": {"input": {"turn_detection": {"type": "server_vad", "eagerness": "low"}}}}
    await session.handle_text(json.dumps({"type": "session.update", "session": bad}))
    error = t.of("error")[-1]["error"]
    assert "eagerness" in error["message"]
    wrong = {"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "x"}}}}
    await session.handle_text(json.dumps({"type": "session.update", "session": wrong}))
    assert "eagerness" in t.of("error")[-1]["error"]["message"]
    assert len(t.of("session.updated")) == 1  # neither took effect
    session.close()


@pytest.mark.asyncio
async def test_semantic_vad_without_a_judge_is_refused_clearly(
    scripted_engine: VoxtralEngine,
) -> None:
    session, t, _ = await open_session(scripted_engine, **semantic())
    error = t.of("error")[-1]["error"]
    assert error["code"] == "semantic_vad_unavailable" and "server_vad" in error["message"]
    assert not t.of("session.updated")
    session.close()


def test_a_judge_that_cannot_load_stops_start_up_unless_a_fallback_is_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from voxtral_server.models.turn import judge as judge_module
    from voxtral_server.models.turn.base import TurnJudgeUnavailable
    from voxtral_server.models.turn.worker import load_judge

    def broken(kind: str = "smart_turn", **_: object) -> Any:
        raise TurnJudgeUnavailable(
            "Smart Turn needs the pipecat-ai package: pip install pipecat-ai"
        )

    monkeypatch.setattr(judge_module, "load_turn_judge", broken)
    with pytest.raises(TurnJudgeUnavailable, match="pipecat-ai"):
        load_judge("smart_turn", required=True)
    worker, why = load_judge("smart_turn", required=False)
    assert worker is None and why is not None and "pipecat-ai" in why


@pytest.mark.asyncio
async def test_a_session_falls_back_to_server_vad_when_allowed(
    scripted_engine: VoxtralEngine,
) -> None:
    settings = Settings.model_validate({"vad": {"type": "semantic_vad", "judge_fallback": True}})
    session, t, _ = await open_session(scripted_engine, settings)
    td = t.of("session.created")[0]["session"]["audio"]["input"]["turn_detection"]
    assert td["type"] == "server_vad"
    feed(session, SPEECH)
    done = await t.wait_for("response.done")
    assert done["timings"]["end_of_turn"] == "silence"
    session.close()


@pytest.mark.asyncio
async def test_a_turn_the_short_timer_ended_is_revised_too(scripted_engine: VoxtralEngine) -> None:
    """eagerness auto ends a turn the judge does not call finished after 250 ms of silence;
    if the speaker goes on, that early end is revised like the judge's own."""
    session, t, _ = await open_session(scripted_engine, judge=FixedJudge(0.0), **semantic("auto"))
    feed(session, SPEECH[: SPEECH_END + 6400])  # 400 ms of silence
    first = await t.wait_for("input_audio_buffer.committed")
    feed(session, SPEECH[START:])
    await t.wait_for("input_audio_buffer.committed", count=2)
    done = await t.wait_for("response.done", count=2)
    assert [e["item_id"] for e in t.of("conversation.item.deleted")] == [first["item_id"]]
    assert t.of("input_audio_buffer.committed")[1]["item_id"] == first["item_id"]
    assert done["timings"]["end_of_turn"] == "silence" and done["timings"]["silence_ms"] == 250
    assert len(session.conversation.history()) == 2  # one exchange
    session.close()


class FlakyJudge:
    """Raises on its first question, then answers."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    def completeness(self, audio: np.ndarray) -> float:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected: the judge failed")
        return 0.75


def test_a_failing_judge_answers_none_and_the_worker_goes_on() -> None:
    worker = JudgeWorker(FlakyJudge())
    _WORKERS.append(worker)
    verdicts: list[float | None] = []
    done = threading.Event()

    def on_verdict(p: float | None, took_ms: float) -> None:
        verdicts.append(p)
        if len(verdicts) == 2:
            done.set()

    worker.ask("a", silence(100), on_verdict)
    worker.ask("b", silence(100), on_verdict)
    assert done.wait(60)
    assert verdicts == [None, 0.75]


def test_a_newer_question_replaces_the_waiting_one_and_close_stops_the_thread() -> None:
    gate, started = threading.Event(), threading.Event()
    asked: list[int] = []

    class Slow:
        name = "slow"

        def completeness(self, audio: np.ndarray) -> float:
            asked.append(audio.size)
            started.set()
            gate.wait(60)
            return 1.0

    worker = JudgeWorker(Slow())
    answered = threading.Event()
    sizes: list[float | None] = []
    worker.ask("blocker", silence(10), lambda p, ms: None)
    assert started.wait(60)  # the blocker is being judged
    worker.ask("s", silence(20), lambda p, ms: sizes.append(p))
    worker.ask("s", silence(30), lambda p, ms: (sizes.append(p), answered.set()))
    assert worker.waiting == 1  # the older question of "s" was replaced
    gate.set()
    assert answered.wait(60)
    assert asked == [160, 480] and sizes == [1.0]
    worker.close()
    assert not worker._thread.is_alive()
