"""WebRTC against the real server with a real aiortc peer: track audio, channel events."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from clients import Client
from conftest import SCRIPT
from servers import on_server, running_server

from voxtral_server.config import Settings
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
