"""The Smart Turn judge: a probability, the same one pipecat's own analyzer gives, and a clear
error naming the package when it cannot load."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_WAV

from voxtral_server.models.audio import PCM16_SCALE, SAMPLE_RATE, read_audio_file
from voxtral_server.models.turn import smart_turn
from voxtral_server.models.turn.judge import TurnJudge, TurnJudgeUnavailable, load_turn_judge

SPEECH = read_audio_file(SAMPLE_WAV)  # the test question, 4 s, PCM16 from a wav


def silence(ms: int) -> np.ndarray:
    return np.zeros(SAMPLE_RATE * ms // 1000, dtype=np.float32)


@pytest.fixture(scope="module")
def judge() -> Iterator[TurnJudge]:
    judge = load_turn_judge("smart_turn")
    yield judge
    judge.close()


def pipecat_probability(audio: np.ndarray) -> float:
    """pipecat's LocalSmartTurnAnalyzerV3 through its public path: PCM16 frames in, the
    analysis of the turn out."""
    from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3

    analyzer = LocalSmartTurnAnalyzerV3(sample_rate=SAMPLE_RATE)
    pcm = np.round(audio * PCM16_SCALE).astype("<i2")
    analyzer.append_audio(pcm.tobytes(), is_speech=True)
    _, metrics = asyncio.run(analyzer.analyze_end_of_turn())
    asyncio.run(analyzer.cleanup())
    assert metrics is not None
    return float(metrics.probability)


CLIPS = {
    "question + 200 ms silence": np.concatenate([SPEECH, silence(200)]),
    "question cut at 1.5 s": SPEECH[: int(1.5 * SAMPLE_RATE)],
    "three questions (over 8 s)": np.concatenate([SPEECH, SPEECH, SPEECH]),
}


@pytest.mark.parametrize("name", CLIPS)
def test_the_probability_is_pipecats_own(judge: TurnJudge, name: str) -> None:
    audio = CLIPS[name]
    assert abs(judge.completeness(audio) - pipecat_probability(audio)) < 1e-5


def test_a_probability_in_0_1_and_the_same_each_time(judge: TurnJudge) -> None:
    for audio in [*CLIPS.values(), silence(0), silence(300)]:
        p = judge.completeness(audio)
        assert 0.0 <= p <= 1.0
        assert judge.completeness(audio) == p


def test_only_the_last_8_s_count(judge: TurnJudge) -> None:
    """Audio longer than the window is judged on its end; shorter is left-padded with zeros."""
    long = CLIPS["three questions (over 8 s)"]
    assert long.size > smart_turn.WINDOW_SAMPLES
    assert judge.completeness(long) == judge.completeness(long[-smart_turn.WINDOW_SAMPLES :])
    short = CLIPS["question + 200 ms silence"]
    padded = np.concatenate([np.zeros(SAMPLE_RATE, dtype=np.float32), short])
    assert judge.completeness(short) == judge.completeness(padded)


def test_two_dimensional_audio_is_refused(judge: TurnJudge) -> None:
    with pytest.raises(ValueError, match="one-dimensional"):
        judge.completeness(np.zeros((2, 100), dtype=np.float32))


def test_a_missing_model_file_names_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(smart_turn, "bundled_model_path", lambda: tmp_path / "nope.onnx")
    with pytest.raises(TurnJudgeUnavailable, match="pipecat-ai") as caught:
        load_turn_judge("smart_turn")
    assert "nope.onnx" in str(caught.value)


def test_a_model_onnxruntime_cannot_read_names_the_package(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(TurnJudgeUnavailable, match="pipecat-ai"):
        smart_turn.SmartTurnJudge(model_path=broken)


def test_a_missing_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pipecat.audio.turn.smart_turn._whisper_features", None)
    with pytest.raises(TurnJudgeUnavailable, match=r"pip install 'pipecat-ai"):
        load_turn_judge("smart_turn")


def test_unknown_kind_and_bad_thread_count_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown turn judge"):
        load_turn_judge("crystal_ball")
    with pytest.raises(ValueError, match="threads"):
        load_turn_judge(threads=0)


def test_a_closed_judge_says_so() -> None:
    judge = load_turn_judge()
    judge.close()
    judge.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        judge.completeness(silence(100))


def test_loading_a_judge_brings_no_web_code_and_no_banner() -> None:
    """pipecat is a voice-agent framework: the judge must take its model and features only."""
    code = (
        "import sys\n"
        "from voxtral_server.models.turn.judge import load_turn_judge\n"
        "load_turn_judge().close()\n"
        "web = ('fastapi', 'starlette', 'uvicorn', 'aiortc', 'av', 'websockets', 'aiohttp')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in web))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout
    assert "Pipecat" not in out.stderr  # pipecat's import banner stays out of the server's log
