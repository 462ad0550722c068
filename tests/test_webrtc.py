"""WebRTC against the real server with a real aiortc peer: track audio, channel events."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from clients import SPEECH, Client
from conftest import SCRIPT
from servers import on_server, running_server

from voxtral_server.api.session import Session
from voxtral_server.config import Settings
from voxtral_server.models.audio import SAMPLE_RATE
from voxtral_server.models.voxtral import VoxtralEngine


@pytest.fixture(scope="module")
def server(scripted_engine: VoxtralEngine) -> Iterator[tuple[str, Any]]:
    with running_server(Settings(), scripted_engine) as running:
        yield running


@pytest.mark.asyncio
async def test_words_arrive_on_the_data_channel(server: tuple[str, Any]) -> None:
    base_url, _app = server
    client = Client()
    try:
        await client.connect(base_url)
        await client.wait_for("session.created")
        done = await client.wait_for("response.done")
    finally:
        await client.close()
    words = [e["delta"] for e in client.events if e["type"] == "response.output_text.delta"]
    assert "".join(words) == SCRIPT
    assert [w.strip() for w in words] == SCRIPT.split()
    assert done["response"]["status"] == "completed"
    assert done["timings"]["transport"] == "webrtc"
    types = [e["type"] for e in client.events]
    assert types.index("input_audio_buffer.speech_started") < types.index("response.created")


def _aligned_snr_db(sent: np.ndarray, heard: np.ndarray) -> tuple[float, float]:
    """(correlation, SNR in dB) of `heard` against `sent`, at the lag that matches best."""
    n = min(sent.size, heard.size)
    spectrum = np.fft.rfft(heard[:n], 2 * n) * np.conj(np.fft.rfft(sent[:n], 2 * n))
    lags = np.fft.irfft(spectrum)
    lag = int(np.argmax(np.abs(lags[:4800])))  # the receiver may add up to 0.3 s before it
    a, b = sent[: n - lag], heard[lag:n]
    gain = float(a @ b / (a @ a))
    noise = b - gain * a
    correlation = float(np.corrcoef(a, b)[0, 1])
    return correlation, 10 * float(np.log10((gain * a) @ (gain * a) / (noise @ noise)))


@pytest.mark.asyncio
async def test_the_session_hears_what_the_client_sent(
    server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opus in, decoded at the transport straight to 16 kHz: the session gets the clip itself
    (up to Opus's coding noise), with no gap, repeat or drift."""
    wanted = SPEECH.size - SAMPLE_RATE // 2  # all but the tail the player may not reach
    heard: list[np.ndarray] = []
    enough = threading.Event()
    append = Session.append_audio

    def recording(self: Session, audio: np.ndarray, continuous: bool = False) -> None:
        heard.append(audio.copy())
        if sum(a.size for a in heard) >= wanted:
            enough.set()
        append(self, audio, continuous)

    monkeypatch.setattr(Session, "append_audio", recording)
    base_url, _app = server
    client = Client()
    try:
        await client.connect(base_url)
        assert await asyncio.to_thread(enough.wait, 60), "the clip never fully arrived"
    finally:
        await client.close()
    correlation, snr_db = _aligned_snr_db(SPEECH[:wanted], np.concatenate(heard))
    print(f"correlation {correlation:.4f}, SNR {snr_db:.1f} dB")
    # Opus alone (aiortc's encoder and decoder, offline) gives 0.973 and 12.5 dB on this
    # clip; one 20 ms frame lost or repeated mid-clip misaligns the rest (about 0.5).
    assert correlation > 0.95
    assert snr_db > 10


async def _orphan_tasks_fail() -> None:
    """(On the server loop.) What aiortc does when its SCTP retransmission timer fires after
    a killed peer's ICE consent expired, before the call is closed: a task nobody keeps fails
    with ConnectionError. And a task of our own that fails unretrieved, for contrast."""
    from aiortc import RTCCertificate, RTCDtlsTransport, RTCIceGatherer, RTCIceTransport
    from aiortc.rtcsctptransport import ForwardTsnChunk, RTCSctpTransport

    ice = RTCIceTransport(RTCIceGatherer())
    sctp = RTCSctpTransport(RTCDtlsTransport(ice, [RTCCertificate.generateCertificate()]))
    chunk = ForwardTsnChunk()
    chunk.cumulative_tsn = 0
    sctp._forward_tsn_chunk = chunk  # something to send, and the DTLS is not connected
    sctp._remote_port = 5000  # as `start()` sets it

    async def ours() -> None:
        raise ConnectionError("our own task")

    # Kept by nobody, as aiortc's `asyncio.ensure_future(self._transmit())` in `_t3_expired`.
    tasks = [asyncio.ensure_future(sctp._transmit()), asyncio.ensure_future(ours())]
    await asyncio.wait(tasks)
    tasks.clear()
    gc.collect()  # the unretrieved exceptions are reported as the tasks are freed


def test_an_aiortc_task_failing_after_its_peer_died_is_logged_as_that_not_as_an_error(
    server: tuple[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    _base_url, app = server
    with caplog.at_level(logging.INFO):
        on_server(app, _orphan_tasks_fail())
    unretrieved = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    # Our own task's failure is still reported as asyncio reports it; aiortc's is not.
    assert len(unretrieved) == 1, [r.getMessage() for r in unretrieved]
    assert "ours()" in unretrieved[0].getMessage()
    peer_gone = [r for r in caplog.records if "after its peer went away" in r.getMessage()]
    assert len(peer_gone) == 1
    assert peer_gone[0].levelno == logging.INFO
    assert "RTCSctpTransport._transmit" in peer_gone[0].getMessage()
