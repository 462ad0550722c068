"""Input audio formats: what decoding an append costs, against 16 kHz PCM (no resampling),
and how much audio the resampler holds back, against soxr's streaming resampler.

    python benchmarks/formats.py [--reps N] [--append-ms MS ...]

Each row decodes one `input_audio_buffer.append` payload (base64 of `--append-ms` of speech
in that format) to 16 kHz float32 the way a session does (`InputDecoder.decode`), `--reps`
times in a stream; the cost is the median per append, and the ratio is against 16 kHz PCM in
the same run. "held back" is the audio a stream of 20 ms appends has sent in but not yet got
out (what end-of-speech detection waits for on top of the audio itself), for this server's
resampler and, for comparison, soxr's ResampleStream (HQ) fed the same appends.
Writes benchmarks/out/formats.json.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time

import numpy as np
import soxr
from _common import median, table, write_json

from voxtral_server.api.audio_formats import AudioFormat, InputDecoder, encode_audio
from voxtral_server.models.audio import SAMPLE_RATE, read_audio_file
from voxtral_server.resources import sample_clip

FORMATS = {
    "audio/pcm 16 kHz (baseline)": AudioFormat("audio/pcm", 16000),
    "audio/pcm 24 kHz": AudioFormat("audio/pcm", 24000),
    "audio/pcmu 8 kHz": AudioFormat("audio/pcmu", 8000),
    "audio/pcma 8 kHz": AudioFormat("audio/pcma", 8000),
}


def payloads(speech: np.ndarray, fmt: AudioFormat, append_ms: int) -> list[str]:
    audio = soxr.resample(speech, SAMPLE_RATE, fmt.rate) if fmt.rate != SAMPLE_RATE else speech
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    step = fmt.rate * append_ms // 1000
    return [
        base64.b64encode(encode_audio(pcm[i : i + step], fmt)).decode()
        for i in range(0, pcm.size - step + 1, step)
    ]


def decode_ms(fmt: AudioFormat, events: list[str], reps: int) -> float:
    decoder = InputDecoder(fmt)
    times = []
    for i in range(reps):
        event = events[i % len(events)]
        t0 = time.perf_counter()
        decoder.decode(event)
        times.append((time.perf_counter() - t0) * 1000)
    return median(times)


def held_back_ms(rate: int, ours: bool) -> float:
    """Audio in minus audio out after 50 appends of 20 ms (ms of input time)."""
    chunk = np.zeros(rate // 50, np.float32)
    if ours:
        decoder = InputDecoder(AudioFormat("audio/pcm", rate))
        out = sum(
            decoder.decode(
                base64.b64encode(encode_audio(chunk.astype(np.int16), decoder.format)).decode()
            ).size
            for _ in range(50)
        )
    else:
        stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        out = sum(stream.resample_chunk(chunk).size for _ in range(50))
    return 1000.0 - out * 1000 / SAMPLE_RATE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--append-ms", type=int, nargs="+", default=[20, 100, 1000])
    args = parser.parse_args(argv)
    speech = read_audio_file(sample_clip())
    rows, results = [], []
    for append_ms in args.append_ms:
        reps = max(20, args.reps * 20 // append_ms)
        base = None
        for name, fmt in FORMATS.items():
            cost = decode_ms(fmt, payloads(speech, fmt, append_ms), reps)
            base = base if base is not None else cost
            per_s = cost * 1000 / append_ms
            rows.append([append_ms, name, cost * 1000, per_s, f"{cost / base:.2f}x"])
            results.append(
                {
                    "append_ms": append_ms,
                    "format": name,
                    "decode_us": cost * 1000,
                    "ms_per_audio_s": per_s,
                    "vs_16k": cost / base,
                }
            )
    print(
        table(
            ["append ms", "format", "decode µs (median)", "ms per s of audio", "vs 16 kHz PCM"],
            rows,
        )
    )
    held = []
    for rate in (24000, 8000):
        ours, theirs = held_back_ms(rate, True), held_back_ms(rate, False)
        held.append([f"{rate} -> 16000", ours, theirs])
        results.append({"held_back_from_hz": rate, "ours_ms": ours, "soxr_stream_hq_ms": theirs})
    print()
    print(table(["resample", "held back ms (ours)", "held back ms (soxr stream HQ)"], held))
    path = write_json("formats", {"results": results, "reps": args.reps})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
