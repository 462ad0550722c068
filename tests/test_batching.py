"""Continuous batching: answers that share decode steps are the answers each gets alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLE_WAV, SCRIPT, engine_settings, speech_like
from fakes import FakeTransport
from reference import reference_ids
from wire import append_event as append
from wire import session_update

from voxtral_server.api.metrics import Metrics
from voxtral_server.api.session import Session
from voxtral_server.config import Settings
from voxtral_server.models.audio import read_audio_file
from voxtral_server.models.types import Chunk, Message, Request, Totals
from voxtral_server.models.voxtral import VoxtralEngine
from voxtral_server.models.voxtral.batching import decode_buckets

N = 8
TOKENS = 24  # every answer runs this long (min = max), so all of them decode together
HOLD_S = 300.0  # only bounds a broken test's hold on the worker (see test_engine.py)


class Steps:
    """A `StepObserver` that keeps every step."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.prefills: list[int] = []

    def prefill_step(self, seconds: float, tokens: int) -> None:
        self.prefills.append(tokens)

    def decode_step(self, seconds: float, batch: int) -> None:
        self.batches.append(batch)


def transcriptions() -> list[Request]:
    return [
        Request(
            speech_like(1.0 + 0.4 * i, seed=100 + i),
            "transcribe",
            language="en",
            max_new_tokens=TOKENS,
            min_new_tokens=TOKENS,
        )
        for i in range(N)
    ]


def final(chunks: list[Chunk]) -> Totals:
    assert chunks[-1].is_final and chunks[-1].totals is not None
    return chunks[-1].totals


def alone(engine: VoxtralEngine, request: Request) -> Totals:
    return final(list(engine.stream(request)))


class Collect:
    """A sink that keeps the chunks of one answer; `done` once the final one came."""

    def __init__(self, on_chunk: Callable[[Chunk], None] | None = None) -> None:
        self.chunks: list[Chunk] = []
        self.done = threading.Event()
        self.on_chunk = on_chunk

    def __call__(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        if self.on_chunk is not None and not chunk.is_final:
            self.on_chunk(chunk)
        if chunk.is_final:
            self.done.set()

    @property
    def totals(self) -> Totals:
        assert self.done.wait(120)
        return final(self.chunks)


def together(
    engine: VoxtralEngine, requests: list[Request], sinks: list[Collect] | None = None
) -> tuple[list[Collect], list[Any]]:
    """Submit every request while the worker is held, so all start in the same turn."""
    sinks = sinks or [Collect() for _ in requests]
    gate, holding = threading.Event(), threading.Event()

    def hold(chunk: Chunk) -> None:
        if not holding.is_set():
            holding.set()
            gate.wait(HOLD_S)

    engine.submit(Request(speech_like(0.5), "chat", max_new_tokens=2, min_new_tokens=2), hold)
    try:
        assert holding.wait(60)
        handles = [engine.submit(r, s) for r, s in zip(requests, sinks, strict=True)]
    finally:
        gate.set()
    for sink in sinks:
        assert sink.done.wait(120)
    return sinks, handles


@pytest.fixture(scope="module")
def steps(random_engine: VoxtralEngine) -> Iterator[Steps]:
    observer = Steps()
    random_engine.observe_steps(observer)
    yield observer
    random_engine.observe_steps(Steps())


def test_decode_buckets() -> None:
    assert decode_buckets(1) == (1,)
    assert decode_buckets(16) == (1, 2, 4, 8, 16)
    assert decode_buckets(12) == (1, 2, 4, 8, 12)


def _parity(engine: VoxtralEngine, steps: Steps | None) -> None:
    requests = transcriptions()
    expected = [alone(engine, r).token_ids for r in requests]
    assert len(set(expected)) > 1  # different clips, different answers: the test can fail
    if steps is not None:
        steps.batches.clear()
    sinks, _ = together(engine, requests)
    assert [s.totals.token_ids for s in sinks] == expected
    assert all(s.totals.status == "completed" for s in sinks)
    if steps is not None:
        assert max(steps.batches) >= N  # they did share decode steps


def test_eight_concurrent_transcriptions_give_the_tokens_each_gives_alone(
    random_engine: VoxtralEngine, steps: Steps
) -> None:
    _parity(random_engine, steps)


@pytest.mark.slow
def test_compiled_batches_give_the_tokens_each_gives_alone(tiny_random: Path) -> None:
    from torch._dynamo.utils import counters

    engine = VoxtralEngine.load(engine_settings(tiny_random, model={"compile": "on"}))
    try:
        assert engine.runtime.compile
        compiled = dict(counters["stats"])
        _parity(engine, None)
        assert dict(counters["stats"]) == compiled  # warm-up compiled every bucket
    finally:
        engine.close()


def test_a_seeded_sampled_answer_is_the_same_alone_and_in_a_batch(
    random_engine: VoxtralEngine,
) -> None:
    def sampled(seed: int | None, i: int = 0) -> Request:
        return Request(
            speech_like(1.5, seed=7),
            "chat",
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            max_new_tokens=TOKENS,
            min_new_tokens=TOKENS,
        )

    first = alone(random_engine, sampled(7)).token_ids
    assert alone(random_engine, sampled(7)).token_ids == first
    assert alone(random_engine, sampled(8)).token_ids != first  # the seed matters
    others = [sampled(None) for _ in range(N - 1)]  # unseeded: each draws its own
    sinks, _ = together(random_engine, [*others, sampled(7)])
    assert sinks[-1].totals.token_ids == first


def test_cancelling_one_of_eight_leaves_the_other_seven_unchanged(
    random_engine: VoxtralEngine,
) -> None:
    requests = transcriptions()
    expected = [alone(random_engine, r).token_ids for r in requests]
    victim = 3
    handles: list[Any] = []

    def cancel_at_first_word(chunk: Chunk) -> None:
        handles[victim].cancel()

    sinks = [Collect(cancel_at_first_word if i == victim else None) for i in range(N)]
    # The handles exist before any chunk: the worker is held while they are submitted.
    gate, holding = threading.Event(), threading.Event()

    def hold(chunk: Chunk) -> None:
        if not holding.is_set():
            holding.set()
            gate.wait(HOLD_S)

    random_engine.submit(Request(speech_like(0.5), "chat", max_new_tokens=2), hold)
    try:
        assert holding.wait(60)
        handles.extend(random_engine.submit(r, s) for r, s in zip(requests, sinks, strict=True))
    finally:
        gate.set()
    cancelled = sinks[victim].totals
    assert cancelled.status == "cancelled"
    assert cancelled.tokens_after_cancel is not None and cancelled.tokens_after_cancel <= 1
    assert cancelled.tokens < TOKENS
    for i, sink in enumerate(sinks):
        if i != victim:
            assert sink.totals.status == "completed"
            assert sink.totals.token_ids == expected[i]


def test_a_failing_request_fails_alone(scripted_engine: VoxtralEngine) -> None:
    def broken(chunk: Chunk) -> None:
        if chunk.chunk_index == 2:
            raise ConnectionError("client went away")

    requests = [Request(speech_like(1.0, seed=i), "chat") for i in range(4)]
    sinks = [Collect(broken if i == 1 else None) for i in range(4)]
    together(scripted_engine, requests, sinks)
    failed = sinks[1].totals
    assert failed.status == "error" and "client went away" in (failed.error or "")
    for i in (0, 2, 3):
        assert sinks[i].totals.status == "completed" and sinks[i].totals.answer == SCRIPT


def test_a_long_prompt_is_prefilled_in_pieces_with_the_same_answer(tiny_scripted: Path) -> None:
    engine = VoxtralEngine.load(engine_settings(tiny_scripted, engine={"prefill_chunk_tokens": 64}))
    observer = Steps()
    engine.observe_steps(observer)
    try:
        totals = alone(engine, Request(read_audio_file(SAMPLE_WAV), "chat"))
        assert totals.answer == SCRIPT
        assert observer.prefills and max(observer.prefills) <= 64
        assert sum(observer.prefills) > 375  # 375 audio tokens alone: many pieces
    finally:
        engine.close()


def test_a_speculative_answer_gives_its_slot_to_a_confirmed_turn(tiny_scripted: Path) -> None:
    engine = VoxtralEngine.load(engine_settings(tiny_scripted, engine={"max_batch": 2}))
    try:
        audio = speech_like(1.0)
        running = Collect()
        confirmed = Collect()

        def confirm_arrives(chunk: Chunk) -> None:  # both slots are taken now
            if chunk.chunk_index == 0:
                engine.submit(Request(audio), confirmed)

        speculative = Collect(confirm_arrives)
        gate, holding = threading.Event(), threading.Event()

        def hold(chunk: Chunk) -> None:
            running(chunk)
            if not holding.is_set():
                holding.set()
                gate.wait(HOLD_S)

        engine.submit(Request(audio), hold)
        try:
            assert holding.wait(60)
            spec = engine.submit(Request(audio, speculative=True), speculative)
        finally:
            gate.set()
        assert speculative.totals.status == "cancelled" and spec.preempted
        assert confirmed.totals.answer == SCRIPT
        assert running.totals.answer == SCRIPT
    finally:
        engine.close()


def test_step_metrics_reach_the_exposition(random_engine: VoxtralEngine) -> None:
    metrics = Metrics()
    random_engine.observe_steps(metrics)
    try:
        alone(random_engine, transcriptions()[0])
    finally:
        random_engine.observe_steps(Steps())
    text = metrics.exposition().decode()
    for name in (
        "voxtral_decode_batch_size_count",
        "voxtral_decode_step_seconds_count",
        "voxtral_prefill_step_seconds_count",
    ):
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert float(line.split()[-1]) >= 1


@pytest.mark.asyncio
async def test_thirty_two_sessions_commit_at_once_and_all_are_answered(
    scripted_engine: VoxtralEngine,
) -> None:
    settings = Settings()
    assert settings.engine.max_batch < 32 <= settings.engine.queue_size  # some must wait
    speech = read_audio_file(SAMPLE_WAV)
    sessions = []
    for _ in range(32):
        transport = FakeTransport()
        session = Session(scripted_engine, settings, transport)
        await session.start()
        await session.handle_text(session_update({"type": "transcription"}, turn_detection=None))
        await session.handle_text(append(speech))
        sessions.append((session, transport))
    for session, _ in sessions:  # a transcription session writes each commit down
        await session.handle_text('{"type": "input_audio_buffer.commit"}')
    completed = "conversation.item.input_audio_transcription.completed"
    done = await asyncio.gather(*(t.wait_for(completed, within_s=120) for _, t in sessions))
    assert [d["transcript"] for d in done] == [SCRIPT] * 32
    for session, transport in sessions:
        assert transport.of("error") == []
        deltas = transport.of("conversation.item.input_audio_transcription.delta")
        assert "".join(e["delta"] for e in deltas) == SCRIPT
        session.close()


def test_a_prompt_longer_than_a_slot_is_still_answered(tiny_scripted: Path) -> None:
    engine = VoxtralEngine.load(engine_settings(tiny_scripted, conversation={"max_turns": 0}))
    try:
        assert engine._batch is not None
        long = Request(speech_like(1.0), "chat", instructions="please listen " * 600)
        totals = alone(engine, long)
        assert totals.status == "completed" and totals.answer == SCRIPT
        assert alone(engine, Request(speech_like(1.0), "chat")).answer == SCRIPT  # still serving
    finally:
        engine.close()


def test_a_conversation_reuses_its_previous_turns_from_the_cache(
    tiny_random: Path, random_engine: VoxtralEngine
) -> None:
    """Each turn's prompt repeats the previous prompt and answer: the slot's row still holds
    them, so only the rest is prefilled, and the answer is still the plain pipeline's."""
    batch = random_engine._batch
    assert batch is not None
    history: list[Message] = []
    for turn in range(3):
        audio = speech_like(1.0 + 0.5 * turn, seed=40 + turn)
        request = Request(
            audio, "chat", history=tuple(history), temperature=0.0, max_new_tokens=TOKENS
        )
        reused = batch.reused_tokens
        totals = alone(random_engine, request)
        assert list(totals.token_ids) == reference_ids(tiny_random, request)
        if turn:  # at least the previous turn's audio was not prefilled again
            assert batch.reused_tokens - reused >= 375
        history += [Message("user", audio=audio), Message("assistant", totals.answer)]


def test_a_remembered_row_is_shared_only_as_far_as_the_model_saw_the_same() -> None:
    import numpy as np
    import torch

    from voxtral_server.models.voxtral.prefix import RowMemory, shared_prefix

    audio = 24
    ids = np.array([1, 3, audio, audio, audio, 4, 7, 8])  # prompt of 6, then an answer 7, 8
    embeds = torch.arange(6 * 2, dtype=torch.float32).reshape(1, 6, 2)
    memory = RowMemory(ids, embeds)
    same = torch.cat([embeds, torch.ones(1, 3, 2)], dim=1)  # the next turn: prompt + answer
    assert shared_prefix(memory, np.append(ids, 9), same, audio) == 8
    other_audio = same.clone()
    other_audio[0, 3] += 1  # the same ids, a different utterance
    assert shared_prefix(memory, np.append(ids, 9), other_audio, audio) == 3
    other_text = np.array([1, 3, audio, audio, audio, 4, 7, 5, 9])
    assert shared_prefix(memory, other_text, same, audio) == 7
    audio_where_answer_was = np.array([1, 3, audio, audio, audio, 4, audio, 8])
    assert shared_prefix(memory, audio_where_answer_was, same[:, :8], audio) == 6
