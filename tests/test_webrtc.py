"""WebRTC against the real server with a real aiortc peer: track audio, channel events."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from clients import Client
from conftest import SCRIPT
from servers import running_server

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
