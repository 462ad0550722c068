"""The WebRTC receive path without a network: packets put back in order, and aiortc's own
Opus encoder in, 16 kHz mono out, with libopus (the fast path) and PyAV (the fallback)."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
from aiortc.codecs.opus import OpusEncoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket
from clients import SPEECH

from voxtral_server.api.transports import audio_in, opus
from voxtral_server.api.transports.reorder import ReorderBuffer
from voxtral_server.models.audio import SAMPLE_RATE

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
FRAME = SAMPLE_RATE // 50  # 20 ms


def encoded(audio: np.ndarray) -> list[JitterFrame]:
    """16 kHz float audio -> the frames aiortc's sender would put on the wire."""
    encoder = OpusEncoder()
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    frames = []
    for i in range(0, pcm.size - FRAME + 1, FRAME):
        frame = av.AudioFrame.from_ndarray(pcm[None, i : i + FRAME], format="s16", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, i
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        packets, timestamp = encoder.encode(frame)
        frames += [JitterFrame(p, timestamp) for p in packets]
    return frames


def decoded(frames: list[JitterFrame]) -> tuple[np.ndarray, audio_in.DirectDecoder]:
    heard: list[np.ndarray] = []
    errors: list[BaseException] = []
    sink = audio_in.DirectDecoder(lambda pcm, ts: heard.append(pcm), errors.append)
    for frame in frames:
        sink.put((OPUS, frame))
    assert not errors
    return np.concatenate(heard), sink


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Best normalised correlation of b against a, over lags of up to 10 ms either way."""
    n = min(a.size, b.size) - 320
    return max(
        float(np.corrcoef(a[160 : 160 + n], b[160 + lag : 160 + lag + n])[0, 1])
        for lag in range(-160, 161)
    )


@pytest.fixture(scope="module")
def frames() -> list[JitterFrame]:
    return encoded(SPEECH)


def test_libopus_is_found_here() -> None:
    # Not a requirement (PyAV decodes without it), but where it silently went missing the
    # fast path would be lost unnoticed.
    assert opus.load_libopus() is not None


def test_libopus_at_16k_and_pyav_at_48k_give_the_same_audio(
    frames: list[JitterFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, _ = decoded(frames)
    monkeypatch.setattr(opus, "load_libopus", lambda: None)
    slow, _ = decoded(frames)
    assert abs(fast.size - slow.size) <= FRAME
    assert correlation(slow, fast) > 0.99
    assert correlation(SPEECH, fast) > 0.95  # Opus's own coding noise (see test_webrtc)


def test_a_lost_frame_is_concealed_and_keeps_the_senders_clock(
    frames: list[JitterFrame],
) -> None:
    whole, _ = decoded(frames)
    lost = [f for i, f in enumerate(frames) if i not in (60, 100, 101)]
    patched, sink = decoded(lost)
    assert sink.concealed == 3 * FRAME
    assert patched.size == whole.size
    # Everything after the gaps is where it belongs (aligned at lag 0).
    tail = slice(102 * FRAME + FRAME, whole.size)
    assert np.corrcoef(whole[tail], patched[tail])[0, 1] > 0.9


def test_a_pause_longer_than_concealment_is_not_filled(frames: list[JitterFrame]) -> None:
    skip = audio_in.MAX_CONCEAL_MS // 20 + 1
    _, sink = decoded(frames[:50] + frames[50 + skip :])
    assert sink.concealed == 0


def test_a_failing_sink_reports_once_and_stops(frames: list[JitterFrame]) -> None:
    errors: list[BaseException] = []

    def broken(pcm: np.ndarray, timestamp: int) -> None:
        raise ValueError("boom")

    sink = audio_in.DirectDecoder(broken, errors.append)
    for frame in frames[:5]:
        sink.put((OPUS, frame))  # never raises into aiortc's receive loop
    assert [str(e) for e in errors] == ["boom"]


def packets(*numbers: int, first: int = 0) -> list[RtpPacket]:
    out = []
    for n in numbers:
        seq = (first + n) % 65536
        packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=(7 + 960 * n) % 2**32)
        packet._data = bytes([n % 256])  # type: ignore[attr-defined]
        out.append(packet)
    return out


def released(buffer: ReorderBuffer, arriving: list[RtpPacket]) -> list[list[int]]:
    """For each packet added: the frames released then (by payload byte)."""
    out = []
    for packet in arriving:
        _, frame = buffer.add(packet)
        got = [] if frame is None else [frame]
        got += list(buffer.ready)
        buffer.ready.clear()
        out.append([f.data[0] for f in got])
    return out


def test_packets_in_order_go_on_at_once_with_timestamps_from_the_first() -> None:
    buffer = ReorderBuffer(window=2)
    arriving = packets(0, 1, 2, first=65534)  # the sequence number wraps
    frames = []
    for packet in arriving:
        _, frame = buffer.add(packet)
        assert frame is not None
        frames.append(frame.timestamp)
    assert frames == [0, 960, 1920]


def test_a_reordered_packet_is_waited_for_within_the_window() -> None:
    assert released(ReorderBuffer(window=1), packets(0, 2, 1, 3)) == [[0], [], [1, 2], [3]]


def test_with_no_window_a_gap_is_given_up_at_once_and_the_late_packet_dropped() -> None:
    buffer = ReorderBuffer(window=0)
    assert released(buffer, packets(0, 2, 1, 3)) == [[0], [2], [], [3]]
    assert (buffer.given_up, buffer.late) == (1, 1)


def test_a_lost_packet_is_given_up_after_the_window_and_the_rest_goes_at_once() -> None:
    buffer = ReorderBuffer(window=2)
    assert released(buffer, packets(0, 2, 3, 4, 5)) == [[0], [], [], [2, 3, 4], [5]]
    assert buffer.given_up == 1


def test_a_restarted_sender_starts_a_new_stream_with_later_timestamps() -> None:
    buffer = ReorderBuffer(window=2)
    old = packets(0, 1, 2, first=40_000)
    new = packets(0, 1, first=1_000)  # far behind: not late packets, a new sequence
    for packet in new:
        packet.timestamp = 123  # unrelated to the old stream's timestamps
    stamps = []
    for packet in old + new:
        _, frame = buffer.add(packet)
        assert frame is not None
        stamps.append(frame.timestamp)
    assert stamps[:3] == [0, 960, 1920] and stamps[3] > stamps[2]
    assert buffer.late == 0
