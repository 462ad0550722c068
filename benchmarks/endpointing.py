"""Endpointing: per turn-detection mode, how soon the first word comes after a finished
sentence, and how often a sentence with a pause in the middle is cut in two.

    python benchmarks/endpointing.py [--mode JSON ...] [--transport websocket|webrtc ...]
                                     [--quick] [--pause-ms MS] [--tail-ms MS] [--model M]

Starts the real app in this process (`create_app`, a tiny scripted checkpoint unless
--model), then for every mode (a `turn_detection` object, passed to `session.update`
untouched, e.g. '{"type": "server_vad", "silence_duration_ms": 500}' or, once the session
has it, '{"type": "semantic_vad", "eagerness": "low"}') and every transport streams every
clip of the labelled Piper sets (`_piper_sets.py`: complete utterances, and utterances with
a 400-1000 ms pause where the sentence is unfinished) IN REAL TIME on a fresh conversation:
--lead-ms of silence, the clip, --tail-ms of silence, in --chunk-ms appends, each sent when
its audio would have been recorded (the end of its span on the wall clock). Then it waits
until every response the server started is done.

  websocket   `input_audio_buffer.append` events (PCM16 16 kHz, base64).
  webrtc      an aiortc peer: the audio goes on its microphone track (Opus, 20 ms frames at
              48 kHz, through the server's receive jitter buffer), events on `oai-events`.

Per clip, on the client's clock (the clock's zero is the wall-clock time the first sample
was recorded, so the real end of speech, the clip's last audible sample, is at
(lead + speech_end + 1) / 16 kHz):
  turns        user items committed (`input_audio_buffer.committed`; a turn the server
               revised is committed again under the same item id: still one turn)
  premature    an item whose last commit arrived before the real end of speech (for a
               paused clip, a turn ended in its pause and never revised)
  answers      `response.done` with status completed
  retractions  `conversation.item.deleted`: answers the server took back (revisions)
  cancelled    `response.done` with status cancelled (this client never cancels: barge-ins
               and retractions)
  start late   the first `speech_started.audio_start_ms` minus the real start of speech;
               the start is clipped when that exceeds the prefix padding kept (300 ms)
  first word   the first delta (`response.output_text.delta`, or a transcript or audio
               delta) of the answer that stood (the last completed one), minus the real end
               of speech; `first_any_ms` is the first delta of any answer
  committed    the last commit's arrival minus the real end of speech (the endpointing wait)
The table per mode and transport: first word p50/p95 over complete clips (those with exactly
one turn), premature commits on paused clips (x of N), turns per complete clip, retractions.
Writes benchmarks/out/endpointing.json and endpointing.png (CDF of first word per mode;
--name changes the stem). `main(argv)` returns 0 when the run finished.
The sets are synthetic speech (one Piper voice).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fractions
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
from _clients import WebRTCClient, WebSocketClient, with_16k_input
from _common import OUT, machine, pct, table, write_json
from _piper_sets import Clip, Labels, complete_set, paused_set
from aiortc.mediastreams import MediaStreamTrack

from voxtral_server.api.app import create_app
from voxtral_server.api.inprocess import InProcessServer
from voxtral_server.config import load_settings
from voxtral_server.models.audio import PCM16_SCALE, SAMPLE_RATE, read_audio_file

ANSWER = "Hello world, the quick brown fox jumps over the lazy dog."
DEFAULT_MODE = '{"type": "server_vad", "silence_duration_ms": 500}'
DELTAS = (
    "response.output_text.delta",
    "response.output_audio_transcript.delta",
    "response.output_audio.delta",
)
EVENT_TIMEOUT_S = 60.0  # after the last audio: time for the server to finish its answers
QUICK_CLIPS = 2  # per set with --quick
PREFIX_PADDING_MS = 300  # audio the server keeps before the detected start (vad default)


def ms_to_samples(ms: int) -> int:
    return SAMPLE_RATE * ms // 1000


@dataclass
class ClipRun:
    """What one clip's conversation saw; times in ms from the first sample's recording."""

    clip: str
    kind: str
    speech_end_ms: float  # the real end of speech (last audible sample)
    pause_ms: tuple[float, float] | None  # the mid-sentence pause, for paused clips
    speech_start_ms: float = 0.0  # the real start of speech (first audible sample)
    events: list[tuple[float, str, str | None]] = field(default_factory=list)  # (ms, type, id)
    commits: list[tuple[float, str]] = field(default_factory=list)  # (ms, item id)
    deleted: list[str] = field(default_factory=list)  # item ids taken back
    starts: list[int] = field(default_factory=list)  # speech_started.audio_start_ms
    statuses: dict[str, str] = field(default_factory=dict)  # response id -> final status
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)  # response id -> timings
    timed_out: bool = False

    def times(self, type_: str) -> list[float]:
        return [at for at, t, _ in self.events if t == type_]

    def summary(self) -> dict[str, Any]:
        commits = self.times("input_audio_buffer.committed")
        last_commit: dict[str, float] = {}
        for at, item in self.commits:
            last_commit[item] = at
        stood = [rid for rid, status in self.statuses.items() if status == "completed"]
        answer = stood[-1] if stood else None
        first = [at for at, t, rid in self.events if t in DELTAS and rid == answer]
        first_any = [at for at, t, _ in self.events if t in DELTAS]
        end = self.speech_end_ms
        return {
            "clip": self.clip,
            "kind": self.kind,
            "turns": len(last_commit),
            "answers": len(stood),  # responses that completed (the client saw them whole)
            "premature": any(at < end for at in last_commit.values()),
            "retractions": len(self.deleted),
            "cancelled": sum(s == "cancelled" for s in self.statuses.values()),
            "start_late_ms": self.starts[0] - self.speech_start_ms if self.starts else None,
            "first_word_ms": first[0] - end if first else None,
            "first_any_ms": first_any[0] - end if first_any else None,
            "committed_ms": commits[-1] - end if commits else None,
            "commits_ms": [at - end for at in commits],
            "speech_stopped_ms": [
                at - end for at in self.times("input_audio_buffer.speech_stopped")
            ],
            "server_first_word_ms": (self.timings.get(answer) or {}).get("first_word_ms"),
            "model_ttft_ms": (self.timings.get(answer) or {}).get("model_ttft_ms"),
            "timed_out": self.timed_out,
            # On the stream's clock (ms from its first sample), to place the commits.
            "speech_end_at_ms": end,
            "pause_at_ms": self.pause_ms,
        }


# ----------------------------------------------------------------- audio out


def wav_clip(path: Path) -> Clip:
    """A complete utterance from a wav file (e.g. the test question, static/sample.wav),
    labelled by level: speech is where it comes within 40 dB of its peak."""
    audio = read_audio_file(path)
    loud = np.flatnonzero(np.abs(audio) > np.abs(audio).max() * 0.01)
    labels = Labels(
        name=path.stem,
        kind="wav",
        text=path.name,
        speech_start=int(loud[0]),
        speech_end=int(loud[-1]),
        samples=audio.size,
    )
    return Clip(labels, audio)


def stream_audio(clip: Clip, lead_ms: int, tail_ms: int) -> np.ndarray:
    silence = np.zeros
    return np.concatenate(
        [
            silence(ms_to_samples(lead_ms), np.float32),
            clip.audio,
            silence(ms_to_samples(tail_ms), np.float32),
        ]
    )


def pcm16(audio: np.ndarray) -> np.ndarray:
    return np.round(np.clip(audio, -1, 32767 / PCM16_SCALE) * PCM16_SCALE).astype("<i2")


async def pace_appends(
    client: WebSocketClient, audio: np.ndarray, chunk_ms: int, t0: float
) -> None:
    """Send `audio` as appends, each when its span has been 'recorded' (t0 + its end)."""
    step = ms_to_samples(chunk_ms)
    pcm = pcm16(audio)
    for start in range(0, pcm.size, step):
        chunk = pcm[start : start + step]
        due = t0 + (start + chunk.size) / SAMPLE_RATE
        await asyncio.sleep(max(0.0, due - time.perf_counter()))  # real-time pacing
        event = {
            "type": "input_audio_buffer.append",
            "audio": base64.b64encode(chunk.tobytes()).decode(),
        }
        await client.send(json.dumps(event))


class ClipMicrophone(MediaStreamTrack):  # type: ignore[misc]
    """An aiortc audio track: 20 ms frames of silence at 48 kHz until `play(audio, t0)`,
    then `audio` (16 kHz), each frame released when its span has been 'recorded' (t0 + its
    end); `played` is set once the last frame of it is out. Silence again after."""

    kind = "audio"
    RATE = 48_000
    FRAME = RATE * 20 // 1000

    def __init__(self) -> None:
        super().__init__()
        self.clock = time.perf_counter()  # when the frame at `pts` 0 was recorded
        self.pts = 0
        self.samples = np.zeros(0, "<i2")
        self.start_pts = 0
        self.played = asyncio.Event()

    def play(self, audio: np.ndarray, t0: float) -> None:
        import soxr

        self.samples = pcm16(soxr.resample(audio, SAMPLE_RATE, self.RATE))
        # The clip starts at the next frame boundary after t0 on the track's clock.
        self.start_pts = max(
            self.pts, -(-round((t0 - self.clock) * self.RATE) // self.FRAME) * self.FRAME
        )
        self.clock_t0 = self.clock + self.start_pts / self.RATE

    async def recv(self) -> Any:
        due = self.clock + (self.pts + self.FRAME) / self.RATE
        await asyncio.sleep(max(0.0, due - time.perf_counter()))  # real-time pacing
        offset = self.pts - self.start_pts
        chunk = (
            self.samples[max(0, offset) : max(0, offset + self.FRAME)]
            if offset >= 0
            else self.samples[:0]
        )
        if offset >= 0 and self.samples.size and offset + self.FRAME >= self.samples.size:
            self.played.set()
        chunk = np.pad(chunk, (0, self.FRAME - chunk.size))
        frame = av.AudioFrame.from_ndarray(chunk[np.newaxis, :], format="s16", layout="mono")
        frame.sample_rate = self.RATE
        frame.pts = self.pts
        frame.time_base = fractions.Fraction(1, self.RATE)
        self.pts += self.FRAME
        return frame


# ----------------------------------------------------------------- one clip


async def _expect(client: Any, type_: str) -> dict[str, Any]:
    while True:
        _, event = await asyncio.wait_for(client.recv(), EVENT_TIMEOUT_S)
        if event["type"] == "error":
            raise RuntimeError(f"{client.name}: server error {event['error']}")
        if event["type"] == type_:
            return event


async def run_clip(
    base_url: str,
    transport: str,
    mode: dict[str, Any],
    clip: Clip,
    lead_ms: int,
    tail_ms: int,
    chunk_ms: int,
) -> ClipRun:
    audio = stream_audio(clip, lead_ms, tail_ms)
    lab = clip.labels
    lead = ms_to_samples(lead_ms)
    run = ClipRun(
        clip=clip.name,
        kind=lab.kind,
        speech_end_ms=(lead + lab.speech_end + 1) * 1000 / SAMPLE_RATE,
        speech_start_ms=(lead + lab.speech_start) * 1000 / SAMPLE_RATE,
        pause_ms=(
            (
                (lead + lab.pause_start) * 1000 / SAMPLE_RATE,
                (lead + lab.pause_end) * 1000 / SAMPLE_RATE,
            )
            if lab.pause_start is not None and lab.pause_end is not None
            else None
        ),
    )
    microphone = ClipMicrophone() if transport == "webrtc" else None
    client: Any = WebRTCClient(microphone=microphone) if microphone else WebSocketClient()
    await client.connect(base_url)
    try:
        await _expect(client, "session.created")
        update = {
            "type": "session.update",
            "session": with_16k_input({"audio": {"input": {"turn_detection": mode}}}),
        }
        await client.send(json.dumps(update))
        await _expect(client, "session.updated")
        t0 = time.perf_counter()
        if microphone is not None:
            microphone.play(audio, t0)
            t0 = microphone.clock_t0  # the clip's first frame, on the track's frame grid
        reader = asyncio.create_task(
            _read(client, run, t0, create=mode.get("create_response", True))
        )
        try:
            if microphone is not None:
                await microphone.played.wait()
            else:
                await pace_appends(client, audio, chunk_ms, t0)
            all_sent = time.perf_counter()
            await client.send(json.dumps({"type": "session.update", "session": {}}))  # barrier
            run.events.append(((all_sent - t0) * 1000, "_all_sent", None))
            await asyncio.wait_for(asyncio.shield(reader), EVENT_TIMEOUT_S)
        except TimeoutError:
            run.timed_out = True
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    finally:
        await client.close()
    return run


async def _read(client: Any, run: ClipRun, t0: float, create: bool) -> None:
    """Record every event until all audio is sent (barrier seen) and every answer is done."""
    created = done = commits = 0
    barrier = False
    while True:
        at, event = await client.recv()
        ms = (at - t0) * 1000
        kind = event["type"]
        if kind == "error":
            raise RuntimeError(f"{client.name}: server error {event['error']}")
        response = event.get("response") or {}
        rid = event.get("response_id") or response.get("id")
        run.events.append((ms, kind, rid))
        if kind == "input_audio_buffer.committed":
            commits += 1
            run.commits.append((ms, event["item_id"]))
        elif kind == "conversation.item.deleted":
            run.deleted.append(event["item_id"])
        elif kind == "input_audio_buffer.speech_started":
            run.starts.append(event["audio_start_ms"])
        elif kind == "response.created":
            created += 1
        elif kind == "response.done":
            done += 1
            run.statuses[rid] = response.get("status")
            run.timings[rid] = event.get("timings") or {}
        elif kind == "session.updated":
            barrier = True
        if barrier and done == created and (not create or created >= commits):
            return


# ----------------------------------------------------------------- report


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    complete = [r for r in rows if r["kind"] == "complete"]
    paused = [r for r in rows if r["kind"] == "paused"]
    wavs = [
        r["first_word_ms"]
        for r in rows
        if r["kind"] == "wav" and r["turns"] == 1 and r["first_word_ms"] is not None
    ]
    firsts = [
        r["first_word_ms"] for r in complete if r["turns"] == 1 and r["first_word_ms"] is not None
    ]
    commits = [
        r["committed_ms"] for r in complete if r["turns"] == 1 and r["committed_ms"] is not None
    ]
    return {
        "wav_clips": sum(r["kind"] == "wav" for r in rows),
        "wav_first_word_p50_ms": pct(wavs, 50),
        "wav_first_word_p95_ms": pct(wavs, 95),
        "complete_clips": len(complete),
        "complete_one_turn": sum(r["turns"] == 1 for r in complete),
        "complete_no_turn": sum(r["turns"] == 0 for r in complete),
        "first_word_p50_ms": pct(firsts, 50),
        "first_word_p95_ms": pct(firsts, 95),
        "committed_p50_ms": pct(commits, 50),
        "paused_clips": len(paused),
        "paused_premature": sum(r["premature"] or r["turns"] > 1 for r in paused),
        "paused_one_turn": sum(r["turns"] == 1 and not r["premature"] for r in paused),
        "complete_premature": sum(r["premature"] for r in complete),
        "retractions": sum(r["retractions"] for r in rows),
        "cancelled": sum(r["cancelled"] for r in rows),
        "clipped_starts": sum(
            r["start_late_ms"] is not None and r["start_late_ms"] > PREFIX_PADDING_MS for r in rows
        ),
        "start_late_max_ms": max(
            (r["start_late_ms"] for r in rows if r["start_late_ms"] is not None), default=None
        ),
        "paused_two_answers": sum(r["answers"] > 1 for r in paused),
        "timed_out": sum(r["timed_out"] for r in rows),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, result in results.items():
        values = np.sort(
            [
                r["first_word_ms"]
                for r in result["clips"]
                if r["kind"] == "complete" and r["turns"] == 1 and r["first_word_ms"] is not None
            ]
        )
        if values.size:
            ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=label)
    ax.set_xlabel("real end of speech -> first word received (ms, complete clips)")
    ax.set_ylabel("fraction of clips")
    ax.set_title("first-word latency per turn-detection mode (Piper sets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def mode_label(mode: dict[str, Any]) -> str:
    return json.dumps(mode, separators=(",", ":"))


# ----------------------------------------------------------------- main


async def run_all(
    base_url: str,
    modes: list[dict[str, Any]],
    transports: list[str],
    clips: list[Clip],
    args: argparse.Namespace,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode in modes:
        for transport in transports:
            label = f"{mode_label(mode)} {transport}"
            rows = []
            t0 = time.perf_counter()
            leads = np.random.default_rng(7).integers(0, 501, len(clips))
            for clip, random_lead in zip(clips, leads, strict=True):
                lead_ms = int(random_lead) if args.random_lead else args.lead_ms
                run = await run_clip(
                    base_url, transport, mode, clip, lead_ms, args.tail_ms, args.chunk_ms
                )
                rows.append(run.summary())
            print(f"{label}: {len(clips)} clips in {time.perf_counter() - t0:.0f} s", flush=True)
            results[label] = {
                "mode": mode,
                "transport": transport,
                "clips": rows,
                "summary": summarise(rows),
            }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--mode",
        action="append",
        help=f"a turn_detection JSON object (repeatable; default {DEFAULT_MODE})",
    )
    parser.add_argument(
        "--transport",
        action="append",
        choices=["websocket", "webrtc"],
        help="repeatable; default websocket",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_CLIPS} clips per set, 1.5 s tail"
    )
    parser.add_argument(
        "--pause-ms", type=int, help="one pause length for every paused clip (default 400-1000)"
    )
    parser.add_argument("--lead-ms", type=int, default=300, help="silence before each clip")
    parser.add_argument(
        "--random-lead", action="store_true", help="a random 0-500 ms lead per clip instead"
    )
    parser.add_argument(
        "--tail-ms",
        type=int,
        help="silence after each clip (default 3000, --quick 1500): longer than any mode waits",
    )
    parser.add_argument("--chunk-ms", type=int, default=20, help="audio per WebSocket append")
    parser.add_argument(
        "--wav",
        type=Path,
        action="append",
        help="a complete utterance to add, as a wav (repeatable; e.g. static/sample.wav)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="stream each --wav clip this many times"
    )
    parser.add_argument("--model", help="hub id or folder (default: a tiny scripted checkpoint)")
    parser.add_argument("--config", type=Path, help="config file (default: ./config.yaml)")
    parser.add_argument("--name", default="endpointing", help="stem of the JSON and PNG in out/")
    parser.add_argument(
        "--replot",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="no run: one CDF of every mode in these earlier results, to out/<--name>.png",
    )
    args = parser.parse_args(argv)
    if args.replot:
        merged: dict[str, Any] = {}
        for path in args.replot:
            for label, result in json.loads(path.read_text())["results"].items():
                merged[f"{label} ({path.stem})"] = result
        plot(merged, OUT / f"{args.name}.png")
        print(f"wrote {OUT / f'{args.name}.png'}")
        return 0
    modes = [json.loads(m) for m in (args.mode or [DEFAULT_MODE])]
    if not all(isinstance(m, dict) for m in modes):
        parser.error("--mode takes a JSON object, the session's turn_detection")
    transports = args.transport or ["websocket"]
    if args.tail_ms is None:
        args.tail_ms = 1500 if args.quick else 3000
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    complete, paused = complete_set(), paused_set(pause_ms=args.pause_ms)
    if args.quick:
        complete, paused = complete[:QUICK_CLIPS], paused[:QUICK_CLIPS]
    extra = [wav_clip(path) for path in args.wav or [] for _ in range(args.repeat)]
    clips = complete + paused + extra
    with tempfile.TemporaryDirectory(prefix="endpointing-") as tmp:
        model = args.model
        if model is None:
            from voxtral_server.models.tiny import build_tiny

            model = str(build_tiny(Path(tmp) / "tiny", script=ANSWER))
        settings = load_settings(args.config, {("model", "id"): model})
        server = InProcessServer(create_app(settings)).start()
        try:
            results = asyncio.run(run_all(server.base_url, modes, transports, clips, args))
        finally:
            server.stop()

    print(f"machine: {machine()}")
    print(
        f"clips: {len(complete)} complete + {len(paused)} paused (Piper, synthetic), streamed in "
        f"real time; lead {args.lead_ms} ms, tail {args.tail_ms} ms; ms from the real end of speech"
    )
    heads = [
        "mode",
        "transport",
        "1st word p50",
        "p95",
        "commit p50",
        "complete: 1 turn",
        "paused: premature",
        "retractions",
        "clipped starts",
        "--wav 1st word p50 / p95",
    ]
    rows = []
    for result in results.values():
        s = result["summary"]
        rows.append(
            [
                mode_label(result["mode"]),
                result["transport"],
                s["first_word_p50_ms"],
                s["first_word_p95_ms"],
                s["committed_p50_ms"],
                f"{s['complete_one_turn']} of {s['complete_clips']}",
                f"{s['paused_premature']} of {s['paused_clips']}",
                s["retractions"],
                f"{s['clipped_starts']} of {len(result['clips'])}",
                f"{s['wav_first_word_p50_ms']:.0f} / {s['wav_first_word_p95_ms']:.0f}"
                if s["wav_clips"]
                else "-",
            ]
        )
    print(table(heads, rows))
    path = write_json(
        args.name,
        {
            "model": args.model or "tiny scripted",
            "lead_ms": args.lead_ms,
            "tail_ms": args.tail_ms,
            "chunk_ms": args.chunk_ms,
            "quick": args.quick,
            "labels": {c.name: asdict(c.labels) for c in clips},
            "results": results,
        },
    )
    print(f"wrote {path}")
    try:
        plot(results, OUT / f"{args.name}.png")
        print(f"wrote {OUT / f'{args.name}.png'}")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
