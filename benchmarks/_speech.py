"""The TTFT suite's speech pass: time to first audio (TTFA) with the config's TTS engine
(espeak-ng when the config has none), and the
phrase chunker against waiting for the sentence end on a long run-on answer.

TTFA turns run like the suite's TTFT turns (fresh conversation, server VAD, the clock starts
when the append that ends the turn is sent), with speech on; the client waits
for the first audio, then cancels (an answer is spoken in real time: 64 words take ~20 s).
  server TTFA      timings.ttfa_ms: end of speech detected -> first audio sent.
  client TTFA      the append that ends the turn -> first audio received: the first
                   response.output_audio.delta (WebSocket), or the first track frame louder
                   than -40 dBFS (WebRTC, after Opus and aiortc's jitter buffer).
Run-on comparison: a tiny model scripted to answer one long sentence with no punctuation
until its end; the same WebSocket turns on two servers in this process, one with the
configured phrase chunking, one that speaks only at sentence ends (phrase words and timeout
set out of reach). The ratio of their TTFA is what phrase chunking buys on such an answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from _clients import DECLARE_16K, WebRTCClient, WebSocketClient

from voxtral_server.api.app import create_app
from voxtral_server.api.inprocess import InProcessServer
from voxtral_server.config import Settings

EVENT_TIMEOUT_S = 120.0
BARRIER = json.dumps({"type": "session.update", "session": {}})
CANCEL = json.dumps({"type": "response.cancel"})
_CLAUSE = "and then the weather turns a little warmer over the hills where the wind comes down"
RUN_ON = " ".join([_CLAUSE] * 18) + "."  # 288 words, one sentence, no other punctuation
SENTENCE_ONLY = {"first_phrase_min_words": 64, "phrase_min_words": 64, "phrase_timeout_ms": 10000}


def speech_engine(base: Settings) -> str:
    """The config's TTS engine, or espeak-ng when the config has none."""
    return base.tts.engine if base.tts.engine != "none" else "espeak"


def with_tts(base: Settings, **tts: Any) -> Settings:
    data = base.model_dump()
    data["tts"].update({"engine": speech_engine(base), **tts})
    return Settings.model_validate(data)


async def _until(client: Any, type_: str) -> tuple[float, dict[str, Any]]:
    while True:
        at, event = await asyncio.wait_for(client.recv(), EVENT_TIMEOUT_S)
        if event["type"] == "error":
            raise RuntimeError(f"{client.name}: server error {event['error']}")
        if event["type"] == type_:
            return at, event


async def speech_turn(
    client_cls: type[WebSocketClient] | type[WebRTCClient],
    base_url: str,
    audio_events: list[str],
    k: int,
) -> dict[str, Any]:
    client = WebRTCClient(listen=True) if client_cls is WebRTCClient else WebSocketClient()
    await client.connect(base_url)
    try:
        await _until(client, "session.created")
        await client.send(DECLARE_16K)
        await _until(client, "session.updated")
        for text in audio_events[:k]:
            await client.send(text)
        await client.send(BARRIER)
        await _until(client, "session.updated")
        sent = time.perf_counter()
        await client.send(audio_events[k])
        if isinstance(client, WebRTCClient):
            await asyncio.wait_for(client.sound.wait(), EVENT_TIMEOUT_S)
            heard_at = next(at for at, level in client.frames if at > sent and level > 0.01)
        else:
            heard_at, _ = await _until(client, "response.output_audio.delta")
        await client.send(CANCEL)
        _, done = await _until(client, "response.done")
    finally:
        await client.close()
    t = done["timings"]
    return {
        "client_ttfa_ms": (heard_at - sent) * 1000,
        "ttfa_ms": t.get("ttfa_ms"),
        "first_word_ms": t.get("first_word_ms"),
        "status": done["response"]["status"],
    }


def _serve(settings: Settings) -> InProcessServer:
    return InProcessServer(create_app(settings)).start()


async def _turns(
    clients: tuple[type[WebSocketClient] | type[WebRTCClient], ...],
    base_url: str,
    audio_events: list[str],
    k: int,
    turns: int,
) -> dict[str, list[dict[str, Any]]]:
    return {
        c.name: [await speech_turn(c, base_url, audio_events, k) for _ in range(turns)]
        for c in clients
    }


def measure_speech(
    base: Settings, audio_events: list[str], k: int, turns: int, tmp: Path, run_on: bool
) -> dict[str, Any]:
    """TTFA rows per transport; with `run_on` (tiny model only) the run-on comparison."""
    out: dict[str, Any] = {}
    server = _serve(with_tts(base))
    try:
        out["ttfa"] = asyncio.run(
            _turns((WebSocketClient, WebRTCClient), server.base_url, audio_events, k, turns)
        )
    finally:
        server.stop()
    if run_on:
        from voxtral_server.models.tiny import build_tiny

        model = str(build_tiny(tmp / "tiny-run-on", script=RUN_ON))
        data = base.model_dump()
        data["model"].update({"id": model, "max_new_tokens": 2048})
        run_on_base = Settings.model_validate(data)
        for name, tts in (("phrases", {}), ("sentence_end", SENTENCE_ONLY)):
            server = _serve(with_tts(run_on_base, **tts))
            try:
                rows = asyncio.run(
                    _turns((WebSocketClient,), server.base_url, audio_events, k, turns)
                )
                out[f"run_on_{name}"] = rows["websocket"]
            finally:
                server.stop()
    return out
