"""Text to speech: one phrase in, mono 16-bit PCM chunks out as soon as they are synthesised.

Engines (`tts.engine`):
  - `espeak`: the espeak-ng program (Debian package `espeak-ng`), run as a separate process per
    phrase. espeak-ng is GPL-3, so it is only ever run as a program, never linked or imported.
    22.05 kHz, robotic but instant: first chunk ~10 ms after the call, real-time factor < 0.01
    (2 CPU cores).
  - `kokoro`: Kokoro-82M (Apache-2.0 weights) through the optional `kokoro` package
    (`pip install 'voxtral-server[kokoro]'`), for GPU hosts. 24 kHz. See docs/tts.md.
  - `none`: `load_tts` returns None; answers stay text only.

Engines yield audio at their own `sample_rate`; `PcmResampler` converts one audio stream to the
rate a transport needs without clicks at chunk boundaries.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import soxr

from ..config import Settings
from .types import EngineError

logger = logging.getLogger(__name__)

CHUNK_MS = 100  # longest chunk an engine yields: a caller can stop the audio at this granularity

ESPEAK_PROGRAM = "espeak-ng"
ESPEAK_DEFAULT_VOICE = "en-us"
ESPEAK_BASE_WPM = 175  # espeak-ng's own default rate; tts.speed scales it
# Text goes to espeak-ng as one argv element, and Linux caps one at 128 KiB; phrases are far
# shorter, so a longer text is a caller bug, refused rather than cut.
ESPEAK_MAX_TEXT_BYTES = 100_000
ESPEAK_PROBE_TIMEOUT_S = 10.0  # the load-time check normally takes ~10 ms
_PIPE_READ_BYTES = 65_536  # while parsing the WAV header; PCM is read in CHUNK_MS slices

KOKORO_SAMPLE_RATE = 24_000  # Hz, fixed by the model's decoder
KOKORO_DEFAULT_VOICE = "af_heart"
KOKORO_REPO = "hexgrad/Kokoro-82M"
KOKORO_CONFIG = "config.json"
KOKORO_WEIGHTS = "kokoro-v1_0.pth"
# Weight file names per hub repository, as in kokoro's own `KModel.MODEL_NAMES`.
KOKORO_WEIGHTS_BY_REPO = {
    KOKORO_REPO: KOKORO_WEIGHTS,
    "hexgrad/Kokoro-82M-v1.1-zh": "kokoro-v1_1-zh.pth",
}
KOKORO_EXTRA = "pip install 'voxtral-server[kokoro]'"
# misaki's English G2P needs this spaCy pipeline; without it misaki would pip-install it from
# the network when the engine loads.
KOKORO_SPACY_MODEL = "en_core_web_sm"
# First letter of a Kokoro voice name -> kokoro's lang_code (the G2P to use). a/b: misaki's
# English G2P; the others go through espeak-ng phonemes (see docs/tts.md).
KOKORO_LANG_CODES = frozenset("abefhijpz")


class TtsError(EngineError):
    """Synthesis of a phrase failed."""

    def __init__(self, message: str) -> None:
        super().__init__("tts_failed", message)


class TtsLoadError(EngineError):
    """The configured engine cannot be used; the message says what is missing and how to get
    it."""

    def __init__(self, message: str) -> None:
        super().__init__("tts_load_failed", message)


class TtsEngine(Protocol):
    name: str  # "espeak" | "kokoro"
    sample_rate: int  # Hz of the PCM that `stream` yields

    def stream(self, text: str) -> Iterator[np.ndarray]:
        """Speak one phrase: yield mono int16 PCM chunks at `sample_rate`, each as soon as it
        is synthesised and none longer than CHUNK_MS.

        Blocking: iterate on a worker thread. Closing the iterator early (`close()`, or
        breaking out of a for loop) stops synthesis and frees what it holds. Raises TtsError
        on failure. Empty or whitespace-only text yields nothing.
        """
        ...

    def close(self) -> None:
        """Free the engine (idempotent); streams still running end early."""
        ...


def load_tts(settings: Settings) -> TtsEngine | None:
    """The engine `settings.tts` asks for, ready to speak; None for `tts.engine: none`.

    Raises TtsLoadError, naming what is missing and how to get it, when the engine cannot be
    used (espeak-ng not installed or the voice unknown; the kokoro packages, weights or voice
    missing).
    """
    tts = settings.tts
    if tts.engine == "none":
        return None
    if tts.engine == "espeak":
        return EspeakTts(voice=tts.voice or ESPEAK_DEFAULT_VOICE, speed=tts.speed)
    if tts.engine == "kokoro":
        return KokoroTts.load(
            tts.model, voice=tts.voice or KOKORO_DEFAULT_VOICE, speed=tts.speed, device=tts.device
        )
    raise TtsLoadError(f"unknown tts.engine {tts.engine!r}: expected none, espeak or kokoro")


# --- resampling ------------------------------------------------------------------------------


def _check_pcm16(pcm: np.ndarray) -> np.ndarray:
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise ValueError(f"expected mono int16 PCM (1-D), got {pcm.dtype} with shape {pcm.shape}")
    return np.ascontiguousarray(pcm)


def resample_pcm16(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """One whole mono int16 signal from `from_rate` to `to_rate` Hz (int16 out)."""
    pcm = _check_pcm16(pcm)
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    if from_rate == to_rate or pcm.size == 0:
        return pcm.copy()
    out: np.ndarray = soxr.resample(pcm, from_rate, to_rate, quality="HQ")
    return out


class PcmResampler:
    """Streaming mono int16 resampler: one per audio stream, so chunk boundaries make no clicks.

    `feed` returns what is ready so far (the filter holds back a few ms, so the first outputs
    are shorter than the input implies); `flush` returns the tail and makes the resampler ready
    for a new, unrelated stream. Concatenating every output matches resampling the whole signal
    at once (to +-2 LSB). Not thread-safe: feed it from one thread.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._stream: Any = None if from_rate == to_rate else self._new_stream()

    def _new_stream(self) -> Any:
        return soxr.ResampleStream(self.from_rate, self.to_rate, 1, dtype="int16", quality="HQ")

    def feed(self, pcm: np.ndarray) -> np.ndarray:
        pcm = _check_pcm16(pcm)
        if self._stream is None:
            return pcm.copy()
        out: np.ndarray = self._stream.resample_chunk(pcm)
        return out

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, dtype=np.int16)
        out: np.ndarray = self._stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        # A new stream rather than soxr's clear(), which leaves state behind (outputs then
        # differ by an LSB from a fresh resampler's).
        self._stream = self._new_stream()
        return out


def _to_chunks(pcm: np.ndarray, chunk_samples: int) -> Iterator[np.ndarray]:
    for start in range(0, pcm.size, chunk_samples):
        yield pcm[start : start + chunk_samples]


def _float_to_pcm16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype(np.int16)


# --- espeak-ng -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WavFormat:
    sample_rate: int
    channels: int
    bits: int


def parse_wav_header(data: bytes) -> tuple[WavFormat, int] | None:
    """The format of a streamed WAV and the offset where its samples start, or None when `data`
    does not hold the whole header yet.

    The data chunk's size is ignored: a program writing WAV to a pipe cannot know it and
    writes a placeholder (espeak-ng: 0x7ffff000), so the samples run to the end of the stream.
    Raises TtsError when the bytes are not a PCM WAV.
    """
    if len(data) < 12:
        return None
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise TtsError(f"expected a WAV stream, got {data[:12]!r}")
    offset = 12
    fmt: WavFormat | None = None
    while len(data) >= offset + 8:
        chunk_id, size = struct.unpack_from("<4sI", data, offset)
        body = offset + 8
        if chunk_id == b"data":
            if fmt is None:
                raise TtsError("WAV stream has no fmt chunk before its data")
            return fmt, body
        if len(data) < body + size:
            return None
        if chunk_id == b"fmt ":
            if size < 16:
                raise TtsError(f"WAV fmt chunk too short ({size} bytes)")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag != 1:  # WAVE_FORMAT_PCM
                raise TtsError(f"WAV stream is not PCM (format tag {tag})")
            fmt = WavFormat(sample_rate=rate, channels=channels, bits=bits)
        offset = body + size + (size & 1)  # chunks are padded to an even length
    return None


class EspeakTts:
    """espeak-ng run as a separate program, one process per phrase (thread-safe).

    Construction checks that the program exists and knows the voice (one ~10 ms run), and
    learns its output rate. `tts.voice` is any espeak-ng voice (`espeak-ng --voices`), with an
    optional variant, e.g. "en-us", "en-gb+f3"; `speed` scales espeak-ng's 175 words/minute.
    """

    name = "espeak"

    def __init__(self, voice: str = ESPEAK_DEFAULT_VOICE, speed: float = 1.0) -> None:
        program = shutil.which(ESPEAK_PROGRAM)
        if program is None:
            raise TtsLoadError(
                "tts.engine espeak needs the espeak-ng program, which is not installed: "
                "install the Debian/Ubuntu package with `apt install espeak-ng`"
            )
        if not voice or voice.startswith("-"):
            raise TtsLoadError(f"invalid espeak-ng voice {voice!r}")
        self.voice = voice
        self.speed = speed
        self.words_per_minute = round(ESPEAK_BASE_WPM * speed)
        self._program = program
        self._lock = threading.Lock()
        self._processes: set[subprocess.Popen[bytes]] = set()
        self._closed = False
        self.sample_rate = self._probe()
        self._chunk_samples = self.sample_rate * CHUNK_MS // 1000
        logger.info(
            "TTS espeak-ng ready: voice %s, %d words/min, %d Hz",
            voice,
            self.words_per_minute,
            self.sample_rate,
        )

    def _command(self, text: str) -> list[str]:
        # `-b 1`: the text is UTF-8; `--` ends the options, so a phrase starting with "-" is
        # spoken rather than parsed as one.
        return [
            self._program,
            "--stdout",
            "-b",
            "1",
            "-v",
            self.voice,
            "-s",
            str(self.words_per_minute),
            "--",
            text,
        ]

    def _probe(self) -> int:
        """Speak nothing once: checks the voice and reads the rate from the WAV header."""
        try:
            done = subprocess.run(
                self._command(""),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=ESPEAK_PROBE_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TtsLoadError(f"cannot run {self._program}: {exc}") from None
        error = done.stderr.decode(errors="replace").strip()
        if done.returncode != 0:
            if "voice" in error.lower():
                raise TtsLoadError(
                    f"espeak-ng has no voice {self.voice!r} ({error}); "
                    "list the installed ones with `espeak-ng --voices`"
                )
            raise TtsLoadError(f"espeak-ng failed (exit code {done.returncode}): {error}")
        header = parse_wav_header(done.stdout)
        if header is None:
            raise TtsLoadError(f"espeak-ng wrote no WAV header ({error or 'no message'})")
        fmt, _ = header
        if fmt.channels != 1 or fmt.bits != 16:
            raise TtsLoadError(f"espeak-ng writes {fmt}, expected mono 16-bit PCM")
        return fmt.sample_rate

    def stream(self, text: str) -> Iterator[np.ndarray]:
        """See `TtsEngine.stream`. Each phrase is a new espeak-ng process, killed (and reaped)
        when the iterator is closed early."""
        text = text.replace("\x00", " ")  # argv cannot carry NUL
        if not text.strip():
            return
        if len(text.encode()) > ESPEAK_MAX_TEXT_BYTES:
            raise TtsError(
                f"phrase too long for espeak-ng ({len(text.encode())} bytes, at most "
                f"{ESPEAK_MAX_TEXT_BYTES}): split the text into phrases"
            )
        with self._lock:
            if self._closed:
                raise TtsError("the espeak engine is closed")
            try:
                process = subprocess.Popen(
                    self._command(text),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            except OSError as exc:
                raise TtsError(f"cannot run {self._program}: {exc}") from None
            self._processes.add(process)
        try:
            yield from self._read(process)
        finally:
            # Runs on normal end, on error and on close(): never leave a process or a zombie.
            if process.poll() is None:
                process.kill()
            process.wait()
            assert process.stdout is not None and process.stderr is not None
            process.stdout.close()
            process.stderr.close()
            with self._lock:
                self._processes.discard(process)

    def _read(self, process: subprocess.Popen[bytes]) -> Iterator[np.ndarray]:
        assert process.stdout is not None and process.stderr is not None
        fd = process.stdout.fileno()
        buffer = bytearray()
        header: tuple[WavFormat, int] | None = None
        while header is None:
            # os.read returns what the pipe holds now instead of waiting to fill a buffer.
            data = os.read(fd, _PIPE_READ_BYTES)
            if not data:
                break
            buffer += data
            header = parse_wav_header(bytes(buffer))
        if header is None:
            self._check_exit(process, "espeak-ng ended before writing a WAV header")
            return
        fmt, start = header
        if fmt.sample_rate != self.sample_rate or fmt.channels != 1 or fmt.bits != 16:
            raise TtsError(f"espeak-ng wrote {fmt}, expected mono 16-bit at {self.sample_rate} Hz")
        del buffer[:start]
        chunk_bytes = 2 * self._chunk_samples
        while True:
            whole = len(buffer) & ~1
            if whole:
                pcm = np.frombuffer(bytes(buffer[:whole]), dtype="<i2").astype(np.int16)
                del buffer[:whole]
                yield from _to_chunks(pcm, self._chunk_samples)
            data = os.read(fd, chunk_bytes)
            if not data:
                break
            buffer += data
        self._check_exit(process, None)

    def _check_exit(self, process: subprocess.Popen[bytes], reason: str | None) -> None:
        """Raise TtsError if espeak-ng failed (or `reason` is given), unless the engine was
        closed meanwhile (close() kills running processes: their streams just end)."""
        assert process.stderr is not None
        returncode = process.wait()
        if self._closed:
            return
        if returncode != 0 or reason is not None:
            error = process.stderr.read().decode(errors="replace").strip()
            raise TtsError(
                f"{reason or 'espeak-ng failed'} (exit code {returncode}): {error or 'no message'}"
            )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            running = list(self._processes)
        for process in running:
            if process.poll() is None:
                process.kill()


# --- Kokoro-82M ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KokoroFiles:
    """Where Kokoro's files are on disk."""

    repo_id: str  # the hub repository the weights come from (decides the G2P version)
    config: Path
    weights: Path
    voice: Path


def _is_hub_id(model: str) -> bool:
    parts = model.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not model.startswith((".", "~"))
        and not Path(model).expanduser().exists()
    )


def _voice_file(voice: str) -> str:
    """The voice's path inside a Kokoro folder or repository."""
    return f"voices/{voice}.pt"


def resolve_kokoro_files(model: str, voice: str) -> KokoroFiles:
    """Find Kokoro's config, weights and voice for `tts.model`: a local folder, or a hub id
    looked up in the local Hugging Face cache first and downloaded only when missing there.

    Raises TtsLoadError naming every missing file.
    """
    voice_path = Path(voice).expanduser() if voice.endswith(".pt") else None
    if not _is_hub_id(model):
        folder = Path(model).expanduser()
        files = KokoroFiles(
            repo_id=KOKORO_REPO,
            config=folder / KOKORO_CONFIG,
            weights=folder / KOKORO_WEIGHTS,
            voice=voice_path or folder / _voice_file(voice),
        )
        missing = [str(p) for p in (files.config, files.weights, files.voice) if not p.is_file()]
        if missing:
            raise TtsLoadError(
                f"tts.model {model!r}: missing Kokoro file(s) {', '.join(missing)}; the folder "
                f"needs {KOKORO_CONFIG}, {KOKORO_WEIGHTS} and {_voice_file(voice)} from the "
                f"{KOKORO_REPO} repository on Hugging Face"
            )
        return files

    wanted = [KOKORO_CONFIG, KOKORO_WEIGHTS_BY_REPO.get(model, KOKORO_WEIGHTS)]
    if voice_path is None:
        wanted.append(_voice_file(voice))
    elif not voice_path.is_file():
        raise TtsLoadError(f"tts.voice {voice!r}: no such voice file")
    found = _hub_files(model, wanted)
    return KokoroFiles(
        repo_id=model,
        config=found[0],
        weights=found[1],
        voice=voice_path or found[2],
    )


def _hub_files(repo_id: str, filenames: list[str]) -> list[Path]:
    try:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    except ImportError:  # a dependency of transformers, so normally present
        raise TtsLoadError(
            f"tts.model {repo_id!r} is a hub id, which needs huggingface_hub: {KOKORO_EXTRA}"
        ) from None
    paths: dict[str, Path] = {}
    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            paths[filename] = Path(cached)
    missing = [f for f in filenames if f not in paths]
    where = f"from the {repo_id} repository on Hugging Face"
    if missing and constants.HF_HUB_OFFLINE:
        raise TtsLoadError(
            f"Kokoro file(s) {', '.join(missing)} {where} are not in the local cache and "
            "HF_HUB_OFFLINE is set: download them on a connected machine "
            f"(`hf download {repo_id} {' '.join(missing)}`), or point tts.model at a folder "
            "holding them"
        )
    for filename in missing:
        logger.info("downloading %s from %s", filename, repo_id)
        try:
            paths[filename] = Path(hf_hub_download(repo_id=repo_id, filename=filename))
        except Exception as exc:  # network, auth, missing repo or file: all mean the same here
            raise TtsLoadError(
                f"cannot get Kokoro file(s) {', '.join(missing)} {where}: {exc}"
            ) from None
    return [paths[f] for f in filenames]


def _kokoro_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TtsLoadError(f"tts.device {device!r}: CUDA is not available on this machine")
    return device


class KokoroTts:
    """Kokoro-82M through the `kokoro` package (optional extra), on a GPU or the CPU.

    Each phrase is one model call per text segment (kokoro splits only beyond ~510 phonemes,
    so a phrase is normally one segment): the first chunk comes when the whole phrase is
    synthesised, then its audio follows in CHUNK_MS slices. Calls are serialised: the model
    and the G2P are shared by every stream.
    """

    name = "kokoro"
    sample_rate = KOKORO_SAMPLE_RATE

    def __init__(self, pipeline: Any, voice: Any, speed: float, device: str) -> None:
        """Wrap a ready `kokoro.KPipeline` and a loaded voice pack; use `KokoroTts.load`."""
        self._pipeline: Any = pipeline
        self._voice = voice
        self.speed = speed
        self.device = device
        self._lock = threading.Lock()
        self._chunk_samples = self.sample_rate * CHUNK_MS // 1000

    @classmethod
    def load(
        cls, model: str, voice: str = KOKORO_DEFAULT_VOICE, speed: float = 1.0, device: str = "auto"
    ) -> KokoroTts:
        """Load Kokoro for `tts.model` (folder or hub id), `tts.voice`, `tts.device`, and warm
        it up. Raises TtsLoadError naming the missing package, weights or voice."""
        started = time.perf_counter()
        lang_code = Path(voice).name[:1].lower()
        if lang_code not in KOKORO_LANG_CODES:
            raise TtsLoadError(
                f"tts.voice {voice!r}: a Kokoro voice name starts with its language "
                f"({', '.join(sorted(KOKORO_LANG_CODES))}), e.g. {KOKORO_DEFAULT_VOICE}"
            )
        # Files before packages: their absence is the likelier problem, and is reported even
        # where the packages are not installed yet.
        files = resolve_kokoro_files(model, voice)
        try:
            kokoro = importlib.import_module("kokoro")
        except ImportError as exc:
            raise TtsLoadError(
                f"tts.engine kokoro needs the optional packages: {KOKORO_EXTRA} ({exc})"
            ) from None
        if lang_code in "ab":
            spacy = importlib.import_module("spacy")
            if not spacy.util.is_package(KOKORO_SPACY_MODEL):
                raise TtsLoadError(
                    f"Kokoro's English G2P (misaki) needs the spaCy pipeline "
                    f"{KOKORO_SPACY_MODEL}: `python -m spacy download {KOKORO_SPACY_MODEL}`"
                )
        resolved_device = _kokoro_device(device)
        try:
            import torch

            kmodel = kokoro.KModel(
                repo_id=files.repo_id, config=str(files.config), model=str(files.weights)
            )
            kmodel = kmodel.to(resolved_device).eval()
            pipeline = kokoro.KPipeline(lang_code=lang_code, repo_id=files.repo_id, model=kmodel)
            # On the CPU: KPipeline only takes a CPU FloatTensor as a ready voice (it moves it
            # to the model's device per call); a CUDA tensor would be mistaken for a name.
            pack = torch.load(str(files.voice), map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or mismatched files, CUDA errors: not usable
            raise TtsLoadError(
                f"cannot load Kokoro from {files.weights} on {resolved_device}: {exc}"
            ) from None
        engine = cls(pipeline, pack, speed, resolved_device)
        try:
            sum(chunk.size for chunk in engine.stream("Hello."))
        except TtsError as exc:
            raise TtsLoadError(f"Kokoro loaded but cannot speak: {exc}") from None
        logger.info(
            "TTS Kokoro ready in %.0f ms: %s, voice %s, %s",
            (time.perf_counter() - started) * 1000.0,
            files.weights,
            voice,
            resolved_device,
        )
        return engine

    def stream(self, text: str) -> Iterator[np.ndarray]:
        """See `TtsEngine.stream`."""
        if not text.strip():
            return
        pipeline, voice = self._pipeline, self._voice
        if pipeline is None:
            raise TtsError("the kokoro engine is closed")
        results = pipeline(text, voice=voice, speed=self.speed)
        try:
            while True:
                # The lock covers synthesis only, never a yield, so a consumer that stops
                # reading cannot block other streams.
                with self._lock:
                    if self._pipeline is None:
                        return  # the engine was closed: end the stream early
                    try:
                        result = next(results)
                    except StopIteration:
                        return
                    except Exception as exc:
                        raise TtsError(f"Kokoro failed: {exc}") from exc
                    audio = result.audio
                    if audio is None:
                        continue
                    pcm = _float_to_pcm16(audio.detach().float().cpu().numpy().reshape(-1))
                yield from _to_chunks(pcm, self._chunk_samples)
        finally:
            results.close()

    def close(self) -> None:
        with self._lock:
            pipeline, self._pipeline, self._voice = self._pipeline, None, None
        if pipeline is not None and self.device.startswith("cuda"):
            import torch

            del pipeline
            torch.cuda.empty_cache()
