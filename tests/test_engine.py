"""The engine against the stock transformers pipeline, and what a caller sees on the way."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SAMPLE_WAV, SCRIPT, engine_settings, speech_like
from reference import MAX_NEW, reference_ids

from voxtral_server.models.audio import (
    SAMPLE_RATE,
    AudioInputError,
    read_audio_file,
)
from voxtral_server.models.types import (
    Chunk,
    EngineError,
    Message,
    ModelLoadError,
    Request,
)
from voxtral_server.models.voxtral import VoxtralEngine

# A test holds the engine's worker in a sink until it sets the gate itself (every test sets
# it, also when it fails). The bound only keeps a broken test from holding the worker forever:
# if it ran out while the test was still arranging the queue on a busy machine, the hold
# would end early and the test would see the wrong state.
HOLD_S = 300.0


def collect(engine: VoxtralEngine, request: Request) -> list[Chunk]:
    return list(engine.stream(request))


def _requests() -> dict[str, Request]:
    audio = speech_like(2.5, seed=11)
    history = (
        Message("user", audio=speech_like(1.5, seed=12)),
        Message("assistant", "an earlier answer"),
    )
    return {
        "transcribe": Request(audio, "transcribe", language="en", max_new_tokens=MAX_NEW),
        "chat": Request(audio, "chat", temperature=0.0, max_new_tokens=MAX_NEW),
        "chat_two_turns": Request(
            audio, "chat", history=history, temperature=0.0, max_new_tokens=MAX_NEW
        ),
    }


def _final(chunks: list[Chunk]) -> Any:
    assert chunks[-1].is_final and chunks[-1].totals is not None
    return chunks[-1].totals


@pytest.mark.parametrize("case", list(_requests()))
@pytest.mark.parametrize("checkpoint", ["tiny_random", "tiny_scripted"])
def test_same_tokens_as_the_reference_pipeline(
    case: str, checkpoint: str, request: pytest.FixtureRequest
) -> None:
    model_dir: Path = request.getfixturevalue(checkpoint)
    engine: VoxtralEngine = request.getfixturevalue(checkpoint.replace("tiny_", "") + "_engine")
    req = _requests()[case]
    totals = _final(collect(engine, req))
    assert totals.status == "completed"
    assert list(totals.token_ids) == reference_ids(model_dir, req)


@pytest.fixture(scope="module")
def compiled_engines(tiny_random: Path, tiny_scripted: Path) -> Iterator[dict[str, Any]]:
    engines = {
        name: VoxtralEngine.load(engine_settings(path, model={"compile": "on", "warmup_runs": 1}))
        for name, path in (("tiny_random", tiny_random), ("tiny_scripted", tiny_scripted))
    }
    yield engines
    for engine in engines.values():
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_requests()))
@pytest.mark.parametrize("checkpoint", ["tiny_random", "tiny_scripted"])
def test_compiled_engine_gives_the_same_tokens(
    case: str, checkpoint: str, compiled_engines: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    engine: VoxtralEngine = compiled_engines[checkpoint]
    assert engine.runtime.compile
    req = _requests()[case]
    totals = _final(collect(engine, req))
    assert list(totals.token_ids) == reference_ids(request.getfixturevalue(checkpoint), req)


@pytest.mark.parametrize("mode", ["transcribe", "chat"])
def test_scripted_words_arrive_one_per_chunk(scripted_engine: VoxtralEngine, mode: str) -> None:
    chunks = collect(scripted_engine, Request(read_audio_file(SAMPLE_WAV), mode))  # type: ignore[arg-type]
    words = [c.text for c in chunks if not c.is_final]
    assert [w.strip() for w in words] == SCRIPT.split()
    assert "".join(words) == SCRIPT
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    totals = _final(chunks)
    assert totals.answer == SCRIPT and totals.words == len(SCRIPT.split())
    assert chunks[0].first_token_latency_ms is not None
    assert totals.model_ttft_ms is not None
    assert totals.model_ttft_ms <= chunks[0].first_token_latency_ms  # queue wait comes first


def test_cancel_after_first_chunk_stops_within_two_tokens(tiny_random: Path) -> None:
    long_script = " ".join(f"word{i}" for i in range(60))
    from voxtral_server.models.tiny import build_tiny

    model_dir = build_tiny(tiny_random.parent / "tiny-long", script=long_script)
    engine = VoxtralEngine.load(engine_settings(model_dir))
    try:
        stream = engine.stream(Request(speech_like(1.0), "chat", max_new_tokens=400))
        chunks: list[Chunk] = []
        for chunk in stream:
            if not chunks:
                stream.cancel()
            chunks.append(chunk)
        totals = _final(chunks)
        assert totals.status == "cancelled"
        # cancel() was called after the first chunk; generation stopped within 2 tokens of it.
        assert totals.tokens_after_cancel is not None and totals.tokens_after_cancel <= 2
        assert totals.tokens >= chunks[0].tokens
        assert totals.tokens < 100  # it did not run on to the end of the 60-word script
        assert totals.cancel_latency_ms is not None
        # The worker is free at once: the next request completes in full.
        after = _final(collect(engine, Request(speech_like(1.0), "chat")))
        assert after.status == "completed" and after.answer == long_script
    finally:
        engine.close()


def test_cancel_while_queued_never_generates(scripted_engine: VoxtralEngine) -> None:
    gate = threading.Event()
    first: list[Chunk] = []

    def hold(chunk: Chunk) -> None:  # keeps the worker busy until the test says so
        first.append(chunk)
        gate.wait(HOLD_S)

    scripted_engine.submit(Request(speech_like(1.0), "chat"), hold)
    try:
        queued = scripted_engine.stream(Request(speech_like(1.0), "chat"))
        queued.cancel()
    finally:
        gate.set()
    totals = _final(list(queued))
    assert totals.status == "cancelled" and totals.tokens == 0


BAD_AUDIO = {
    "empty": (np.zeros(0, np.float32), "empty_audio", "empty"),
    "nan": (np.array([0.0, np.nan] * 800, np.float32), "invalid_audio", "NaN"),
    "inf": (np.array([0.0, np.inf] * 800, np.float32), "invalid_audio", "infinite"),
    "too_long": (np.zeros(31 * SAMPLE_RATE, np.float32), "audio_too_long", "max_utterance_s"),
    "stereo_array": (np.zeros((1600, 2), np.float32), "invalid_audio", "mono"),
}


@pytest.mark.parametrize("case", list(BAD_AUDIO))
def test_bad_audio_is_refused_and_the_engine_keeps_serving(
    scripted_engine: VoxtralEngine, case: str
) -> None:
    audio, code, words = BAD_AUDIO[case]
    with pytest.raises(AudioInputError, match=words) as info:
        scripted_engine.submit(Request(audio, "chat"), lambda c: None)
    assert info.value.code == code
    assert _final(collect(scripted_engine, Request(speech_like(1.0), "chat"))).answer == SCRIPT


def test_unknown_mode_is_refused(scripted_engine: VoxtralEngine) -> None:
    with pytest.raises(EngineError, match="transcribe or chat"):
        scripted_engine.submit(Request(speech_like(1.0), "sing"), lambda c: None)  # type: ignore[arg-type]


def test_unreadable_and_missing_files(scripted_engine: VoxtralEngine, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF....WAVEnot really audio")
    with pytest.raises(AudioInputError, match="cannot decode audio") as info:
        read_audio_file(garbage)
    assert info.value.code == "unreadable_audio"
    with pytest.raises(AudioInputError, match="no such file"):
        read_audio_file(tmp_path / "missing.wav")
    good = read_audio_file(SAMPLE_WAV)
    assert _final(collect(scripted_engine, Request(good, "chat"))).answer == SCRIPT


def test_any_rate_and_channels_become_16k_mono(tmp_path: Path) -> None:
    import soundfile as sf

    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1) * 0.3
    path = tmp_path / "stereo44k.flac"
    sf.write(str(path), stereo, 44100)
    audio = read_audio_file(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - SAMPLE_RATE) <= 2
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / audio.size - 440) < 2


def test_full_queue_answers_busy_and_recovers(tiny_scripted: Path) -> None:
    engine = VoxtralEngine.load(
        engine_settings(tiny_scripted, engine={"queue_size": 1}, server={"max_sessions": 1})
    )
    running, gate = threading.Event(), threading.Event()

    def hold(chunk: Chunk) -> None:  # the worker is busy with this request until released
        running.set()
        gate.wait(HOLD_S)

    try:
        engine.submit(Request(speech_like(1.0), "chat"), hold)
        assert running.wait(30)
        waiting = engine.stream(Request(speech_like(1.0), "chat"))  # fills the queue
        with pytest.raises(EngineError, match="queue_size") as info:
            engine.submit(Request(speech_like(1.0), "chat"), lambda c: None)
        assert info.value.code == "engine_busy"
        gate.set()
        assert _final(list(waiting)).answer == SCRIPT
    finally:
        gate.set()
        engine.close()


def test_close_ends_queued_requests_and_refuses_new_ones(tiny_scripted: Path) -> None:
    engine = VoxtralEngine.load(engine_settings(tiny_scripted))
    gate = threading.Event()
    engine.submit(Request(speech_like(1.0), "chat"), lambda c: gate.wait(HOLD_S))
    queued = engine.stream(Request(speech_like(1.0), "chat"))
    closer = threading.Thread(target=engine.close)
    closer.start()
    gate.set()
    closer.join(30)
    assert not closer.is_alive()
    assert _final(list(queued)).status == "cancelled"
    with pytest.raises(EngineError, match="shutting down"):
        engine.submit(Request(speech_like(1.0), "chat"), lambda c: None)
    engine.close()  # idempotent
    assert not engine.ready


def test_missing_model_folder_names_make_tiny(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="make-tiny") as info:
        VoxtralEngine.load(engine_settings(tmp_path / "nothing-here"))
    assert "nothing-here" in str(info.value)


def test_processor_mel_switch_serves_the_same_answer(tiny_random: Path) -> None:
    req = _requests()["transcribe"]
    engine = VoxtralEngine.load(engine_settings(tiny_random, model={"mel": "processor"}))
    try:
        assert list(_final(collect(engine, req)).token_ids) == reference_ids(tiny_random, req)
    finally:
        engine.close()


def test_a_cancel_after_the_last_word_leaves_the_answer_completed(
    scripted_engine: VoxtralEngine,
) -> None:
    stream = scripted_engine.stream(Request(speech_like(1.0), "chat"))
    chunks = list(stream)
    stream.cancel()  # too late: everything was already handed out
    assert _final(chunks).status == "completed"
    late: list[Chunk] = []

    def cancel_at_final(chunk: Chunk) -> None:
        late.append(chunk)
        if len(late) == len(SCRIPT.split()):  # the last word: cancel before the final chunk
            handle.cancel()

    handle = scripted_engine.submit(Request(speech_like(1.0), "chat"), cancel_at_final)
    gate = scripted_engine.stream(Request(speech_like(1.0), "chat"))  # queued behind it
    list(gate)
    assert late[-1].totals is not None and late[-1].totals.status == "completed"


def test_an_error_mid_stream_keeps_what_was_sent(scripted_engine: VoxtralEngine) -> None:
    received: list[Chunk] = []

    def flaky(chunk: Chunk) -> None:
        received.append(chunk)
        if len(received) == 3:
            raise ConnectionError("client went away")

    scripted_engine.submit(Request(speech_like(1.0), "chat"), flaky)
    after = scripted_engine.stream(Request(speech_like(1.0), "chat"))
    assert _final(list(after)).answer == SCRIPT  # the worker survived
    final = received[-1]
    assert final.is_final and final.totals is not None
    assert final.totals.status == "error" and "client went away" in (final.totals.error or "")
    # Two chunks were delivered; the third's delivery failed, so it is not counted.
    assert final.chunk_index == 2 and final.totals.answer == "".join(c.text for c in received[:2])


@pytest.mark.slow
def test_no_request_compiles_after_warm_up(compiled_engines: dict[str, Any]) -> None:
    from torch._dynamo.utils import counters

    engine: VoxtralEngine = compiled_engines["tiny_random"]
    collect(engine, Request(speech_like(1.0), "transcribe", max_new_tokens=8))
    compiled = dict(counters["stats"])
    assert compiled.get("unique_graphs", 0) >= 1  # warm-up compiled, and it was counted
    requests = [
        Request(speech_like(9.0), "transcribe", max_new_tokens=16),
        Request(speech_like(2.0), "chat", max_new_tokens=12, temperature=0.0),
        Request(
            speech_like(3.0),
            "chat",
            history=(
                Message("user", audio=speech_like(4.0)),
                Message("assistant", "before"),
                Message("user", audio=speech_like(1.0)),
                Message("assistant", "and again"),
            ),
            max_new_tokens=20,
        ),
    ]
    for request in requests:
        assert _final(collect(engine, request)).status == "completed"
    assert dict(counters["stats"]) == compiled  # same graphs: nothing compiled per request


def test_a_long_chat_encodes_each_utterance_once_and_answers_the_same(
    tiny_random: Path, random_engine: VoxtralEngine
) -> None:
    """Turn after turn the history's audio comes from the encoder cache (the history keeps
    the very arrays that were answered), and every answer still equals the plain pipeline's,
    which re-reads all the audio."""
    history: list[Message] = []  # the last three exchanges
    for turn in range(4):
        audio = speech_like(1.0 + 0.5 * turn, seed=20 + turn)
        request = Request(
            audio, "chat", history=tuple(history), temperature=0.0, max_new_tokens=MAX_NEW
        )
        hits = random_engine._embeds.hits
        totals = _final(collect(random_engine, request))
        assert list(totals.token_ids) == reference_ids(tiny_random, request)
        earlier = sum(m.audio is not None for m in request.history)
        assert random_engine._embeds.hits - hits == earlier  # none re-encoded
        history += [Message("user", audio=audio), Message("assistant", totals.answer)]
        del history[: max(0, len(history) - 6)]
