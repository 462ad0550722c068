"""TTS engines (espeak-ng for real, Kokoro's loading and streaming logic), and the resampler."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from voxtral_server.config import Settings
from voxtral_server.models.audio import PcmResampler, resample_pcm16
from voxtral_server.models.tts import CHUNK_MS, TtsError, TtsLoadError, load_tts
from voxtral_server.models.tts import espeak as espeak_module
from voxtral_server.models.tts.espeak import EspeakTts, parse_wav_header
from voxtral_server.models.tts.kokoro import KokoroTts, resolve_kokoro_files

PHRASE = "Hello world, this is a test."
# ~8 s of speech: ~350 KB of PCM, far more than a pipe holds (64 KiB), so espeak-ng cannot
# have finished when the first chunk is read.
LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog. Then it runs far away into the forest, "
    "where nobody can see it any more, and the evening comes slowly over the quiet hills."
)
ESPEAK_MISSING = shutil.which("espeak-ng") is None
needs_espeak = pytest.mark.skipif(ESPEAK_MISSING, reason="install the Debian package espeak-ng")


def tts_settings(**values: object) -> Settings:
    data = Settings().model_dump()
    data["tts"].update(values)
    return Settings.model_validate(data)


def espeak_children() -> list[tuple[int, str]]:
    """(pid, state) of this process's espeak-ng children, zombies ("Z") included."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # The command name is in parentheses and may itself hold spaces or parentheses.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if name == "espeak-ng" and int(ppid) == os.getpid():
            children.append((int(entry.name), state))
    return children


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))


@pytest.fixture
def espeak() -> Iterator[EspeakTts]:
    engine = load_tts(tts_settings(engine="espeak"))
    assert isinstance(engine, EspeakTts)
    yield engine
    engine.close()


def test_engine_none_is_text_only() -> None:
    assert load_tts(tts_settings(engine="none")) is None


# --- espeak-ng -------------------------------------------------------------------------------


@needs_espeak
def test_espeak_streams_speech(espeak: EspeakTts) -> None:
    assert espeak.name == "espeak"
    assert espeak.sample_rate == 22050
    chunks = list(espeak.stream(PHRASE))
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.dtype == np.int16 and chunk.ndim == 1
        assert 0 < chunk.size <= espeak.sample_rate * CHUNK_MS // 1000
    pcm = np.concatenate(chunks)
    assert 0.5 < pcm.size / espeak.sample_rate < 5.0
    assert rms(pcm) > 500  # silence is 0; espeak-ng speaks at ~3000 RMS
    assert espeak_children() == []


@needs_espeak
def test_espeak_first_chunk_comes_while_it_still_synthesises(espeak: EspeakTts) -> None:
    stream = espeak.stream(LONG_TEXT)
    first = next(stream)
    # The process cannot have finished: its output does not fit in the pipe.
    assert [state for _, state in espeak_children()] not in ([], ["Z"])
    rest = np.concatenate(list(stream))
    assert first.size < rest.size
    assert rest.size / espeak.sample_rate > 4.0
    assert espeak_children() == []


@needs_espeak
def test_closing_the_stream_early_kills_espeak(espeak: EspeakTts) -> None:
    stream = espeak.stream(LONG_TEXT)
    next(stream)
    assert len(espeak_children()) == 1
    stream.close()
    assert espeak_children() == []  # killed and reaped: no zombie either

    for _ in espeak.stream(LONG_TEXT):
        break  # leaving a for loop closes the generator once it is dropped
    assert espeak_children() == []


@needs_espeak
def test_closing_the_engine_ends_running_streams(espeak: EspeakTts) -> None:
    stream = espeak.stream(LONG_TEXT)
    next(stream)
    espeak.close()
    list(stream)  # ends early, without an error
    assert espeak_children() == []
    with pytest.raises(TtsError):
        list(espeak.stream(PHRASE))
    espeak.close()  # idempotent


@needs_espeak
def test_espeak_speed() -> None:
    slow = load_tts(tts_settings(engine="espeak", speed=1.0))
    fast = load_tts(tts_settings(engine="espeak", speed=2.0))
    assert slow is not None and fast is not None
    slow_samples = sum(c.size for c in slow.stream(PHRASE))
    fast_samples = sum(c.size for c in fast.stream(PHRASE))
    assert fast_samples < 0.75 * slow_samples


@needs_espeak
def test_espeak_empty_text_yields_nothing(espeak: EspeakTts) -> None:
    assert list(espeak.stream("")) == []
    assert list(espeak.stream("  \n\t ")) == []


@needs_espeak
@pytest.mark.parametrize("text", ["Grüße, naïve café – 東京", "-v is not an option", "a\x00b"])
def test_espeak_speaks_awkward_text(espeak: EspeakTts, text: str) -> None:
    pcm = np.concatenate(list(espeak.stream(text)))
    assert pcm.size > 0.2 * espeak.sample_rate
    assert rms(pcm) > 300


@needs_espeak
def test_espeak_other_voice_and_unknown_voice() -> None:
    engine = load_tts(tts_settings(engine="espeak", voice="en-gb+f3"))
    assert engine is not None
    assert sum(c.size for c in engine.stream(PHRASE)) > 0
    with pytest.raises(TtsLoadError) as error:
        load_tts(tts_settings(engine="espeak", voice="nosuchvoice"))
    assert error.value.code == "tts_load_failed"
    assert "nosuchvoice" in str(error.value) and "espeak-ng --voices" in str(error.value)


def test_espeak_missing_program_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(espeak_module.shutil, "which", lambda _name: None)
    with pytest.raises(TtsLoadError) as error:
        load_tts(tts_settings(engine="espeak"))
    assert "apt install espeak-ng" in str(error.value)


def _wav_header(rate: int, extra_chunk: bytes = b"") -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF\xff\xff\xff\x7fWAVE"
        + extra_chunk
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data\x00\xf0\xff\x7f"
    )


def test_parse_wav_header() -> None:
    header = _wav_header(22050, extra_chunk=b"LIST\x03\x00\x00\x00abc\x00")
    for cut in range(len(header)):
        assert parse_wav_header(header[:cut]) is None
    parsed = parse_wav_header(header + b"\x01\x00")
    assert parsed is not None
    fmt, start = parsed
    assert (fmt.sample_rate, fmt.channels, fmt.bits, start) == (22050, 1, 16, len(header))
    with pytest.raises(TtsError):
        parse_wav_header(b"ID3\x04" + bytes(60))


# --- resampling ------------------------------------------------------------------------------


def sine(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.round(12_000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(pcm.size)))
    return float(np.fft.rfftfreq(pcm.size, 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("to_rate", [48_000, 24_000, 16_000])
def test_resampler_streams_without_seams(to_rate: int) -> None:
    from_rate = 22_050
    signal = sine(440.0, 2.0, from_rate)
    resampler = PcmResampler(from_rate, to_rate)
    outputs = []
    start = 0
    for size in itertools.cycle([1, 7, 331, 1023, 2205, 17]):
        if start >= signal.size:
            break
        outputs.append(resampler.feed(signal[start : start + size]))
        start += size
    outputs.append(resampler.flush())
    assert all(out.dtype == np.int16 for out in outputs)
    streamed = np.concatenate(outputs)

    expected = signal.size * to_rate / from_rate
    assert abs(streamed.size - expected) <= 0.01 * expected
    assert abs(peak_hz(streamed, to_rate) - 440.0) < 2.0
    whole = resample_pcm16(signal, from_rate, to_rate)
    assert whole.size == streamed.size
    # A seam at a chunk boundary would show as a jump of thousands; the filters agree to a few
    # LSB.
    assert np.abs(whole.astype(np.int32) - streamed.astype(np.int32)).max() <= 4


def test_resampler_flush_starts_a_new_stream() -> None:
    signal = sine(300.0, 0.5, 22_050)
    reused = PcmResampler(22_050, 48_000)
    reused.feed(sine(1000.0, 0.3, 22_050))
    reused.flush()
    again = np.concatenate([reused.feed(signal), reused.flush()])
    fresh = PcmResampler(22_050, 48_000)
    assert np.array_equal(again, np.concatenate([fresh.feed(signal), fresh.flush()]))


def test_resampler_same_rate_and_bad_input() -> None:
    signal = sine(440.0, 0.1, 24_000)
    same = PcmResampler(24_000, 24_000)
    assert np.array_equal(same.feed(signal), signal)
    assert same.flush().size == 0
    with pytest.raises(ValueError):
        same.feed(signal.astype(np.float32))
    with pytest.raises(ValueError):
        PcmResampler(0, 24_000)


# --- Kokoro ----------------------------------------------------------------------------------

KOKORO_FILES = ["config.json", "kokoro-v1_0.pth", "voices/af_heart.pt"]


def fake_kokoro_folder(root: Path, voice: str = "af_heart") -> Path:
    (root / "voices").mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / "kokoro-v1_0.pth").write_bytes(b"")
    (root / "voices" / f"{voice}.pt").write_bytes(b"")
    return root


def test_kokoro_missing_folder_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(TtsLoadError) as error:
        load_tts(tts_settings(engine="kokoro", model=str(tmp_path / "nowhere")))
    assert error.value.code == "tts_load_failed"
    for name in [*KOKORO_FILES, "hexgrad/Kokoro-82M"]:
        assert name in str(error.value)


def test_kokoro_missing_voice_is_named(tmp_path: Path) -> None:
    folder = fake_kokoro_folder(tmp_path / "kokoro")
    with pytest.raises(TtsLoadError) as error:
        load_tts(tts_settings(engine="kokoro", model=str(folder), voice="bm_george"))
    assert f"missing Kokoro file(s) {folder / 'voices' / 'bm_george.pt'};" in str(error.value)


def test_kokoro_without_the_package_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fake_kokoro_folder(tmp_path / "kokoro")
    monkeypatch.setitem(sys.modules, "kokoro", None)  # makes `import kokoro` fail
    with pytest.raises(TtsLoadError) as error:
        load_tts(tts_settings(engine="kokoro", model=str(folder)))
    assert "pip install 'voxtral-server[kokoro]'" in str(error.value)


def test_kokoro_voice_must_name_a_language(tmp_path: Path) -> None:
    folder = fake_kokoro_folder(tmp_path / "kokoro", voice="xx_nobody")
    with pytest.raises(TtsLoadError) as error:
        load_tts(tts_settings(engine="kokoro", model=str(folder), voice="xx_nobody"))
    assert "xx_nobody" in str(error.value)


def test_kokoro_hub_id_offline_and_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TtsLoadError) as error:
        load_tts(tts_settings(engine="kokoro", model="hexgrad/Kokoro-82M"))
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message
    for name in [*KOKORO_FILES, "hexgrad/Kokoro-82M"]:
        assert name in message


def test_kokoro_hub_id_found_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--hexgrad--Kokoro-82M"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name in KOKORO_FILES:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(b"")
    files = resolve_kokoro_files("hexgrad/Kokoro-82M", "af_heart")
    assert files.repo_id == "hexgrad/Kokoro-82M"
    assert (files.config, files.weights, files.voice) == tuple(snapshot / n for n in KOKORO_FILES)


class FakeResult:
    def __init__(self, audio: torch.Tensor | None) -> None:
        self.audio = audio


class FakePipeline:
    """Stands in for kokoro.KPipeline: one result per sentence, like the real one per segment."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[dict[str, Any]] = []
        self.closed = 0

    def __call__(self, text: str, voice: Any, speed: float) -> Iterator[FakeResult]:
        self.calls.append({"text": text, "voice": voice, "speed": speed})
        try:
            for n, _ in enumerate(text.split(".")[:-1]):
                if self.fail:
                    raise RuntimeError("boom")
                yield FakeResult(None if n == 1 else 0.5 * torch.ones(6000 + n))
        finally:
            self.closed += 1


def test_kokoro_stream_converts_and_slices_audio() -> None:
    pipeline = FakePipeline()
    engine = KokoroTts(pipeline, voice="pack", speed=1.5, device="cpu")
    assert engine.sample_rate == 24_000
    chunks = list(engine.stream("One. Two. Three."))
    assert pipeline.calls == [{"text": "One. Two. Three.", "voice": "pack", "speed": 1.5}]
    assert [c.size for c in chunks] == [2400, 2400, 1200, 2400, 2400, 1202]
    assert all(c.dtype == np.int16 for c in chunks)
    assert np.all(np.concatenate(chunks) == 16384)

    stream = engine.stream("One. Two.")
    next(stream)
    stream.close()
    assert pipeline.closed == 2  # the pipeline's own generator was closed too
    assert list(engine.stream("  ")) == []

    stream = engine.stream("One. Two.")
    next(stream)
    engine.close()
    # The segment already synthesised is still yielded; the next one is not.
    assert [c.size for c in stream] == [2400, 1200]
    engine.close()
    with pytest.raises(TtsError):
        list(engine.stream("Hello."))


def test_kokoro_stream_failure_is_a_tts_error() -> None:
    engine = KokoroTts(FakePipeline(fail=True), voice="pack", speed=1.0, device="cpu")
    with pytest.raises(TtsError) as error:
        list(engine.stream("Hello."))
    assert error.value.code == "tts_failed" and "boom" in str(error.value)


def _real_kokoro_model() -> str:
    model = os.environ.get("VOXTRAL_TTS_KOKORO_MODEL", "hexgrad/Kokoro-82M")
    try:
        resolve_kokoro_files(model, "af_heart")
    except TtsLoadError:
        pytest.skip("Kokoro-82M weights (hexgrad/Kokoro-82M) are not available offline")
    if importlib.util.find_spec("kokoro") is None:
        pytest.skip("the kokoro extra is not installed: pip install 'voxtral-server[kokoro]'")
    return model


def test_kokoro_speaks_with_the_real_weights() -> None:
    model = _real_kokoro_model()
    engine = load_tts(tts_settings(engine="kokoro", model=model))
    assert engine is not None
    try:
        pcm = np.concatenate(list(engine.stream(PHRASE)))
    finally:
        engine.close()
    assert pcm.dtype == np.int16
    assert 0.5 < pcm.size / engine.sample_rate < 5.0
    assert rms(pcm) > 300


@pytest.mark.skipif(
    importlib.util.find_spec("kokoro") is None,
    reason="the kokoro extra is not installed: pip install 'voxtral-server[kokoro]'",
)
def test_kokoro_loads_and_speaks_with_random_weights(tmp_path: Path) -> None:
    """The real loading code against the real package, offline: a tiny random Kokoro (the
    weights file holds no tensors, so KModel keeps its random initialisation) and a Spanish
    voice, whose G2P needs no spaCy pipeline (English needs en_core_web_sm)."""
    folder = tmp_path / "kokoro"
    (folder / "voices").mkdir(parents=True)
    config = {
        "vocab": {c: i + 1 for i, c in enumerate("abdefiklmnoprstuwxyzɾθðɲʎʝβɣˈˌ .,!?")},
        "n_token": 64,
        "hidden_dim": 512,  # kokoro's modules hard-code 512 channels and a 128+128 style
        "style_dim": 128,
        "n_layer": 1,
        "max_dur": 4,
        "dropout": 0.0,
        "text_encoder_kernel_size": 3,
        "n_mels": 8,
        "plbert": {
            "hidden_size": 16,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 512,
            "num_hidden_layers": 1,
            "embedding_size": 8,
        },
        "istftnet": {
            "upsample_kernel_sizes": [20, 12],
            "upsample_rates": [10, 6],
            "gen_istft_hop_size": 5,
            "gen_istft_n_fft": 20,
            "resblock_dilation_sizes": [[1, 3, 5]],
            "resblock_kernel_sizes": [3],
            "upsample_initial_channel": 512,
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({}, folder / "kokoro-v1_0.pth")
    torch.save(torch.randn(510, 1, 256) * 0.15, folder / "voices" / "ef_dora.pt")
    engine = load_tts(tts_settings(engine="kokoro", model=str(folder), voice="ef_dora"))
    assert isinstance(engine, KokoroTts)
    try:
        chunks = list(engine.stream("Hola, ¿cómo estás?"))
    finally:
        engine.close()
    assert chunks and all(c.dtype == np.int16 and c.size <= 2400 for c in chunks)
