"""The shared VAD worker: batched streams hear what a model of their own would hear."""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest
import silero_vad
import torch
from conftest import SAMPLE_WAV

from voxtral_server.models.audio import read_audio_file
from voxtral_server.models.vad import (
    FRAME_SAMPLES,
    Hysteresis,
    SpeechStarted,
    SpeechStopped,
    VadEvent,
    VadWorker,
)

SPEECH = read_audio_file(SAMPLE_WAV)  # speech 0.3-2.7 s, then silence


def reference_events(audio: np.ndarray, threshold: float = 0.5, silence_ms: int = 500) -> list:
    """One packaged Silero model, frame by frame, through the same hysteresis."""
    model = silero_vad.load_silero_vad()
    judge = Hysteresis(threshold, silence_ms)
    events = []
    for start in range(0, audio.size - FRAME_SAMPLES + 1, FRAME_SAMPLES):
        with torch.inference_mode():
            prob = float(
                model(torch.from_numpy(audio[start : start + FRAME_SAMPLES].copy()), 16000)
            )
        level = float(np.abs(audio[start : start + FRAME_SAMPLES]).max())
        events.extend(judge.judge(start, prob, level))
    return events


class Collector:
    def __init__(self) -> None:
        self.events: queue.Queue[tuple[int, VadEvent]] = queue.Queue()

    def __call__(self, epoch: int, events: list[VadEvent]) -> None:
        for event in events:
            self.events.put((epoch, event))

    def take(self, count: int) -> list[VadEvent]:
        return [self.events.get(timeout=60)[1] for _ in range(count)]


@pytest.fixture(scope="module")
def worker() -> VadWorker:
    w = VadWorker()
    yield w
    w.close()


def test_streams_judged_together_hear_what_one_model_each_would(worker: VadWorker) -> None:
    expected = reference_events(SPEECH)
    assert type(expected[0]) is SpeechStarted and type(expected[-1]) is SpeechStopped
    quiet = np.zeros_like(SPEECH)
    quieter = (SPEECH * 0.5).astype(np.float32)  # different audio in the same batches
    sinks = [Collector(), Collector(), Collector()]
    streams = [worker.open(0.5, 500, 0, sink) for sink in sinks]
    rng = np.random.default_rng(3)
    offsets = [0, 0, 0]
    audios = [SPEECH, quieter, quiet]
    while any(o < SPEECH.size for o in offsets):  # interleaved, in uneven pieces
        for i, stream in enumerate(streams):
            size = int(rng.integers(1, 2000))
            stream.feed(audios[i][offsets[i] : offsets[i] + size])
            offsets[i] += size
    assert sinks[0].take(len(expected)) == expected
    quieter_expected = reference_events(quieter)
    assert sinks[1].take(len(quieter_expected)) == quieter_expected
    for stream in streams:
        stream.close()
    assert sinks[2].events.empty()  # digital silence is never speech
    assert worker.streams == 0


def test_a_reset_drops_what_was_heard_and_counts_from_the_new_offset(worker: VadWorker) -> None:
    sink = Collector()
    stream = worker.open(0.5, 500, 1000, sink)
    gate = threading.Event()
    stream.feed(SPEECH[: SPEECH.size // 2])
    stream.reset(50_000)  # e.g. a commit: verdicts on the earlier audio are stale
    gate.set()
    stream.feed(SPEECH)
    events = []
    expected = reference_events(SPEECH)
    while len(events) < len(expected):
        epoch, event = sink.events.get(timeout=60)
        if epoch == stream.epoch:
            events.append(event)
    assert events == [type(e)(e.sample + 50_000) for e in expected]
    stream.close()
