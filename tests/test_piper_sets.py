"""The labelled Piper sets the endpointing benchmark streams: labels that match the audio,
pauses cut where speech was already quiet, and a cache that makes them once."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import REPO

from voxtral_server.models.audio import SAMPLE_RATE

pytest.importorskip("piper", reason="piper-tts (the test extra) is not installed")


@pytest.fixture(scope="module")
def sets() -> Iterator[ModuleType]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import _piper_sets

        yield _piper_sets
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_complete_clips_end_where_their_labels_say(sets: ModuleType) -> None:
    clips = sets.complete_set()
    assert len(clips) == len(sets.COMPLETE) >= 10
    for clip in clips:
        lab = clip.labels
        assert 0 <= lab.speech_start < lab.speech_end < lab.samples == clip.audio.size
        assert np.all(np.abs(clip.audio[lab.speech_end + 1 :]) < sets.AUDIBLE)
        assert abs(clip.audio[lab.speech_end]) >= sets.AUDIBLE
        assert (lab.speech_end - lab.speech_start) / SAMPLE_RATE > 1.0
        assert lab.pause_start is None and "|" not in lab.text


def test_paused_clips_pause_once_mid_sentence_where_speech_was_quiet(sets: ModuleType) -> None:
    clips = sets.paused_set()
    assert len(clips) == len(sets.PAUSED) >= 10
    assert [c.labels.pause_ms for c in clips] == list(sets.PAUSES_MS)
    assert min(sets.PAUSES_MS) == 400 and max(sets.PAUSES_MS) == 1000
    for clip in clips:
        lab = clip.labels
        assert lab.speech_start < lab.pause_start < lab.pause_end < lab.speech_end
        assert lab.pause_end - lab.pause_start == SAMPLE_RATE * lab.pause_ms // 1000
        assert not np.any(clip.audio[lab.pause_start : lab.pause_end])  # true silence
        # Speech on both sides: the pause is inside the sentence, not at its end.
        before = clip.audio[lab.speech_start : lab.pause_start]
        after = clip.audio[lab.pause_end : lab.speech_end]
        assert before.size > SAMPLE_RATE // 2 and after.size > SAMPLE_RATE // 4
        assert np.abs(after[: SAMPLE_RATE // 5]).max() >= sets.AUDIBLE, lab.name
        # Cut where the sentence was already quiet (a word boundary), not inside a vowel.
        assert lab.cut_db <= -25, (lab.name, lab.cut_db)


def test_a_fixed_pause_length_for_the_whole_set(sets: ModuleType) -> None:
    clips = sets.paused_set(sets.PAUSED[:2], pause_ms=700)
    assert [c.labels.pause_ms for c in clips] == [700, 700]


def test_the_cache_gives_back_the_same_clip_without_piper(
    sets: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = sets.paused_set(sets.PAUSED[:1], pause_ms=500, cache=tmp_path)[0]
    assert len(list(tmp_path.glob("*.wav"))) == len(list(tmp_path.glob("*.json"))) == 1

    def no_piper(self: object) -> None:
        raise AssertionError("Piper loaded although the clip is cached")

    monkeypatch.setattr(sets._Synth, "voice", no_piper)
    again = sets.paused_set(sets.PAUSED[:1], pause_ms=500, cache=tmp_path)[0]
    assert again.labels == first.labels
    assert np.array_equal(again.audio, first.audio)


def test_silence_goes_in_with_fades_and_the_cut_finds_the_quiet_spot(sets: ModuleType) -> None:
    loud = np.ones(100, dtype=np.float32)
    out = sets.insert_silence(loud, 50, 30, 5)
    assert out.size == 130 and not out[50:80].any()
    assert out[49] == 0.0 and out[80] == 0.0 and out[45] == 1.0 and out[85] == 1.0
    audio = np.ones(200, dtype=np.float32)
    audio[120:130] = 0.0
    assert 120 <= sets.quietest(audio, 100, 150, 10) <= 130


def test_the_smart_turn_evaluation_cuts_inside_the_pause_and_pads_after_the_end(
    sets: ModuleType,
) -> None:
    import smart_turn_eval

    complete, paused = sets.complete_set()[:1], sets.paused_set()[:1]
    cases = smart_turn_eval.conditions(complete, paused)
    clip, audio = cases["paused @200 ms"][1][0]
    assert cases["paused @200 ms"][0] is False
    assert audio.size == clip.labels.pause_start + SAMPLE_RATE // 5
    assert not audio[clip.labels.pause_start :].any()  # only pause, no speech after the cut
    clip, audio = cases["complete +300 ms"][1][0]
    assert cases["complete +300 ms"][0] is True
    assert audio.size == clip.labels.speech_end + 1 + SAMPLE_RATE * 3 // 10
    assert abs(audio[clip.labels.speech_end]) >= sets.AUDIBLE
