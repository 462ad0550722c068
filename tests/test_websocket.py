"""The /v1/realtime WebSocket against the real server, with our client and OpenAI's."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import websockets
from conftest import SAMPLE_WAV, SCRIPT
from servers import running_server
from wire import DECLARE_16K, PUSH_TO_TALK, appends

from voxtral_server.config import Settings
from voxtral_server.models.audio import read_audio_file
from voxtral_server.models.resample import resample
from voxtral_server.models.voxtral import VoxtralEngine

SPEECH = read_audio_file(SAMPLE_WAV)


@pytest.fixture(scope="module")
def server(scripted_engine: VoxtralEngine) -> Iterator[str]:
    with running_server(Settings(), scripted_engine) as (url, _app):
        yield url.replace("http", "ws") + "/v1/realtime"


async def recv_until(ws: Any, type_: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), 60))
        seen.append(event)
        if event["type"] == type_:
            return event


def deltas(seen: list[dict[str, Any]]) -> list[str]:
    return [e["delta"] for e in seen if e["type"] == "response.output_text.delta"]


@pytest.mark.asyncio
async def test_server_vad_turn_streams_the_scripted_words(server: str) -> None:
    seen: list[dict[str, Any]] = []
    async with websockets.connect(server) as ws:
        await recv_until(ws, "session.created", seen)
        await ws.send(DECLARE_16K)
        for message in appends(SPEECH):
            await ws.send(message)
        done = await recv_until(ws, "response.done", seen)
    assert [d.strip() for d in deltas(seen)] == SCRIPT.split()
    assert "".join(deltas(seen)) == SCRIPT
    types = [e["type"] for e in seen]
    assert types.index("input_audio_buffer.speech_stopped") < types.index("response.created")
    assert done["response"]["status"] == "completed"
    timings = done["timings"]
    assert timings["transport"] == "websocket"
    for key in ("queue_wait_ms", "model_ttft_ms", "first_word_ms", "total_ms", "words", "tokens"):
        assert timings[key] is not None


@pytest.mark.asyncio
async def test_push_to_talk_turn(server: str) -> None:
    seen: list[dict[str, Any]] = []
    async with websockets.connect(server) as ws:
        await recv_until(ws, "session.created", seen)
        await ws.send(PUSH_TO_TALK)
        await recv_until(ws, "session.updated", seen)
        for message in appends(SPEECH):
            await ws.send(message)
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await recv_until(ws, "input_audio_buffer.committed", seen)
        await ws.send(json.dumps({"type": "response.create"}))
        await recv_until(ws, "response.done", seen)
    assert [d.strip() for d in deltas(seen)] == SCRIPT.split()
    assert not any(e["type"] == "input_audio_buffer.speech_started" for e in seen)


@pytest.mark.asyncio
async def test_the_official_openai_client_receives_the_words(server: str) -> None:
    """It declares no format: OpenAI's default, PCM16 at 24 kHz, is what it sends."""
    from openai import AsyncOpenAI

    http_base = server.replace("ws://", "http://").removesuffix("/realtime")
    client = AsyncOpenAI(api_key="unused-locally", base_url=http_base)
    words: list[str] = []
    async with client.realtime.connect(model="voxtral") as conn:
        await conn.session.update(
            session={"type": "realtime", "audio": {"input": {"turn_detection": None}}}
        )
        speech = resample(SPEECH, 16000, 24000)
        step = 24 * 100
        for i in range(0, speech.size, step):
            pcm = (np.clip(speech[i : i + step], -1, 1) * 32767).astype("<i2").tobytes()
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        async for event in conn:
            if event.type == "response.output_text.delta":
                words.append(event.delta)
            elif event.type == "response.done":
                break
            elif event.type == "error":
                pytest.fail(f"server error: {event.error}")
    assert "".join(words) == SCRIPT
