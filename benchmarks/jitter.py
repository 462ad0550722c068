"""WebRTC receive buffering: input lag against audio damage, per `webrtc.jitter_window`.

This kernel has no netem (`tc qdisc add dev lo root netem` fails, in a user namespace too),
so an impairing UDP relay (`_relay.py`) sits between an aiortc client and the server (run
in this process, tiny scripted model, one server per setting): client->server RTP is
dropped, reordered or delayed after a clean first second. The client's microphone plays a
speech clip in a loop, in real time, 20 ms frames at 48 kHz (what a browser sends).

Settings: the server's reorder buffer with each `--window`, and aiortc's own
`JitterBuffer(capacity=16, prefetch=4)` (what the server used before; `--no-aiortc` skips it).
Per setting and condition, one call of `--seconds`:
- input lag: when a frame's audio reached the session (`Call.hear`) minus when the client's
  track handed that frame to its sender: network + buffering + decoding. p50, p95.
- lost: frames sent that never reached the session as themselves; concealed: the part of
  those filled in by libopus's concealment (the rest is missing: later audio moves earlier);
- corr / SNR: what the session got, placed on the sender's clock (RTP timestamps), against
  the clip that was sent (Opus alone gives ~0.97 / ~12.5 dB on this clip).

    python benchmarks/jitter.py [--window 0 1 2 4] [--seconds 10] [--no-aiortc]

Writes benchmarks/out/jitter.json and jitter.png.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import soxr
from _common import OUT, pct, table, write_json
from _relay import Impairment, Relay

from voxtral_server.api.app import create_app
from voxtral_server.api.inprocess import InProcessServer
from voxtral_server.api.transports import audio_in, webrtc
from voxtral_server.config import Settings
from voxtral_server.models.audio import SAMPLE_RATE, read_audio_file
from voxtral_server.models.tiny import build_tiny

CLIP = Path(__file__).resolve().parent.parent / "static" / "sample.wav"
WIRE_RATE = 48000
FRAME_S = 0.020
TICKS_PER_SAMPLE = WIRE_RATE // SAMPLE_RATE  # RTP ticks (48 kHz) per 16 kHz sample
OPUS_DELAY = int(0.0065 * SAMPLE_RATE)  # Opus's look-ahead: decoded audio comes 6.5 ms late
CONDITIONS = [
    Impairment("clean"),
    Impairment("2% loss", loss=0.02),
    Impairment("10% reordered by 30 ms", reorder=0.10, reorder_ms=30),
    Impairment("jitter 0-20 ms", jitter_ms=20),
    Impairment("jitter 0-40 ms", jitter_ms=40),
]


class Microphone:
    """An aiortc audio track: `audio` (16 kHz) looped, as 20 ms frames at 48 kHz in real
    time; `sent[k]` is when frame k was handed to the sender."""

    kind = "audio"

    def __init__(self, audio: np.ndarray) -> None:
        from aiortc import MediaStreamTrack

        wire = soxr.resample(audio, SAMPLE_RATE, WIRE_RATE)
        self.pcm = (np.clip(wire, -1, 1) * 32767).astype(np.int16)
        self.sent: list[float] = []
        outer = self

        class Track(MediaStreamTrack):
            kind = "audio"

            async def recv(self) -> av.AudioFrame:
                return await outer.next_frame()

        self.track = Track()
        self._start: float | None = None

    async def next_frame(self) -> av.AudioFrame:
        k = len(self.sent)
        if self._start is None:
            self._start = time.perf_counter()
        await asyncio.sleep(max(0.0, self._start + k * FRAME_S - time.perf_counter()))
        n = int(WIRE_RATE * FRAME_S)
        at = (k * n) % (self.pcm.size - n)
        frame = av.AudioFrame.from_ndarray(self.pcm[None, at : at + n], format="s16", layout="mono")
        frame.sample_rate = WIRE_RATE
        frame.pts = k * n
        frame.time_base = fractions.Fraction(1, WIRE_RATE)
        self.sent.append(time.perf_counter())
        return frame

    def reference(self, samples: int) -> np.ndarray:
        """What was sent, at 16 kHz, as the sender's clock lays it out."""
        n16 = int(SAMPLE_RATE * FRAME_S)
        clip = soxr.resample(self.pcm.astype(np.float32) / 32768, WIRE_RATE, SAMPLE_RATE)
        frames = [clip[(k * n16) % (clip.size - n16) :][:n16] for k in range(samples // n16 + 1)]
        return np.concatenate(frames)[:samples]


class AiortcBuffer:
    """aiortc's own JitterBuffer(16, 4) where the server's ReorderBuffer would go."""

    def __init__(self, window: int) -> None:
        from aiortc.jitterbuffer import JitterBuffer

        self._buffer = JitterBuffer(capacity=16, prefetch=4)
        self.ready: deque[Any] = deque()  # it releases one frame per packet, never more

    def add(self, packet: Any) -> tuple[bool, Any]:
        return self._buffer.add(packet)


class Ear:
    """Every piece of audio the server's calls hand to their session, timestamped."""

    def __init__(self) -> None:
        self.pieces: list[tuple[float, int, np.ndarray]] = []
        original = webrtc.Call.hear
        ear = self

        def hear(call: webrtc.Call, pcm: np.ndarray, timestamp: int) -> None:
            ear.pieces.append((time.perf_counter(), timestamp, pcm.copy()))
            original(call, pcm, timestamp)

        webrtc.Call.hear = hear  # type: ignore[method-assign]


async def one_call(base_url: str, impairment: Impairment, seconds: float, ear: Ear) -> dict:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    mic = Microphone(read_audio_file(CLIP))
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("oai-events")
    pc.addTrack(mic.track)
    await pc.setLocalDescription(await pc.createOffer())
    relay = Relay(impairment)
    offer = pc.localDescription.sdp
    await relay.start(Relay.host_of(offer))
    ear.pieces.clear()
    async with httpx.AsyncClient() as http:
        reply = await http.post(
            f"{base_url}/v1/realtime/calls",
            content=relay.offer_for_server(offer),
            headers={"content-type": "application/sdp"},
        )
    reply.raise_for_status()
    await pc.setRemoteDescription(
        RTCSessionDescription(relay.answer_for_client(reply.text), "answer")
    )
    await asyncio.sleep(seconds)  # the call runs in real time: a measuring window, not a sync
    sent = list(mic.sent)
    await pc.close()
    relay.close()
    return analyse(mic, sent, list(ear.pieces), relay)


def analyse(mic: Microphone, sent: list[float], pieces: list[Any], relay: Relay) -> dict:
    n16 = int(SAMPLE_RATE * FRAME_S)
    frames = len(sent) - 10  # the last few may still be on their way when the call ends
    heard = np.zeros(frames * n16, np.float32)
    lags, arrived, concealed = [], set(), 0
    for i, (at, timestamp, pcm) in enumerate(pieces):
        end = timestamp // TICKS_PER_SAMPLE
        following = pieces[i + 1] if i + 1 < len(pieces) else None
        if following is not None and following[1] == timestamp:
            # A concealment piece: it stands just before the frame that carries its timestamp.
            start, end = end - pcm.size, end
            concealed += pcm.size
        else:
            start, end = end, end + pcm.size
            k = timestamp // (TICKS_PER_SAMPLE * n16)
            if k < frames:
                arrived.add(k)
                lags.append((at - sent[k]) * 1000)
        if start >= 0 and end <= heard.size:
            heard[start:end] = pcm
    reference = mic.reference(heard.size)
    skip = 50 * n16  # the clean warm-up second
    a, b = reference[skip : heard.size - OPUS_DELAY], heard[skip + OPUS_DELAY :]
    gain = float(a @ b / (a @ a))
    noise = b - gain * a
    return {
        "frames_sent": frames,
        "lag_p50_ms": pct(lags, 50),
        "lag_p95_ms": pct(lags, 95),
        "lag_max_ms": max(lags) if lags else float("nan"),
        "lost_pct": 100 * (frames - len(arrived)) / frames,
        "concealed_pct": 100 * concealed / (frames * n16),
        "corr": float(np.corrcoef(a, b)[0, 1]),
        "snr_db": 10 * float(np.log10((gain * a) @ (gain * a) / max(noise @ noise, 1e-12))),
        "relay_dropped": relay.dropped,
        "relay_reordered": relay.reordered,
    }


def plot(results: list[dict[str, Any]]) -> None:
    """Lag p50 and p95 (bars) and audio lost (dots) per condition, one colour per setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    settings = list(dict.fromkeys(r["setting"] for r in results))
    conditions = list(dict.fromkeys(r["condition"] for r in results))
    fig, (lag_ax, lost_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    width = 0.8 / len(settings)
    for i, setting in enumerate(settings):
        rows = {r["condition"]: r for r in results if r["setting"] == setting}
        x = [c + (i - (len(settings) - 1) / 2) * width for c in range(len(conditions))]
        p95 = [rows[c]["lag_p95_ms"] for c in conditions]
        p50 = [rows[c]["lag_p50_ms"] for c in conditions]
        lag_ax.bar(x, p95, width, color=f"C{i}", alpha=0.35)
        lag_ax.bar(x, p50, width, color=f"C{i}", label=setting)
        lost_ax.bar(x, [rows[c]["lost_pct"] for c in conditions], width, color=f"C{i}")
    lag_ax.set_ylabel("input lag (ms): p50, p95 pale")
    lost_ax.set_ylabel("audio lost (%)")
    lost_ax.set_xticks(range(len(conditions)), conditions, fontsize=8)
    lag_ax.legend(fontsize=8)
    for ax in (lag_ax, lost_ax):
        ax.grid(alpha=0.3, axis="y")
    lag_ax.set_title("WebRTC receive buffering through an impaired relay", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT / "jitter.png", dpi=110)
    print(f"wrote {OUT / 'jitter.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--no-aiortc", action="store_true", help="skip aiortc's JitterBuffer")
    parser.add_argument("--seconds", type=float, default=10.0, help="per call")
    args = parser.parse_args(argv)
    ear = Ear()
    settings_list: list[tuple[str, int]] = [] if args.no_aiortc else [("aiortc 16/4", 0)]
    settings_list += [(f"window {w}", w) for w in args.window]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp) / "tiny", script="Hi.")
        for label, window in settings_list:
            settings = Settings().with_overrides(
                {("model", "id"): str(model), ("webrtc", "jitter_window"): window}
            )
            reorder_buffer = audio_in.ReorderBuffer
            if label.startswith("aiortc"):
                audio_in.ReorderBuffer = AiortcBuffer  # type: ignore[misc,assignment]
            try:
                with InProcessServer(create_app(settings)) as server:
                    for impairment in CONDITIONS:
                        row = asyncio.run(one_call(server.base_url, impairment, args.seconds, ear))
                        row.update(setting=label, condition=impairment.name)
                        results.append(row)
                        print(
                            f"{label}, {impairment.name}: lag p50 {row['lag_p50_ms']:.1f} ms, "
                            f"lost {row['lost_pct']:.1f}%",
                            flush=True,
                        )
            finally:
                audio_in.ReorderBuffer = reorder_buffer  # type: ignore[misc]
    headers = [
        "setting",
        "condition",
        "lag p50 (ms)",
        "lag p95 (ms)",
        "lag max (ms)",
        "lost %",
        "concealed %",
        "corr",
        "SNR (dB)",
    ]
    keys = ["lag_p50_ms", "lag_p95_ms", "lag_max_ms", "lost_pct", "concealed_pct"]
    rows = [
        [r["setting"], r["condition"], *(float(r[k]) for k in keys), f"{r['corr']:.3f}"]
        + [float(r["snr_db"])]
        for r in results
    ]
    print(table(headers, rows))
    path = write_json("jitter", {"seconds": args.seconds, "runs": results})
    print(f"\nwrote {path}")
    plot(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
