"""Kokoro-82M (Apache-2.0 weights) through the optional `kokoro` package, for GPU hosts.
24 kHz. See docs/tts.md."""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..audio import float_to_pcm16
from .base import CHUNK_MS, TtsError, TtsLoadError, to_chunks

logger = logging.getLogger(__name__)

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
                    pcm = float_to_pcm16(audio.detach().float().cpu().numpy().reshape(-1))
                yield from to_chunks(pcm, self._chunk_samples)
        finally:
            results.close()

    def close(self) -> None:
        with self._lock:
            pipeline, self._pipeline, self._voice = self._pipeline, None, None
        if pipeline is not None and self.device.startswith("cuda"):
            import torch

            del pipeline
            torch.cuda.empty_cache()
