"""TLS: `serve --tls-cert --tls-key` (uvicorn's own TLS), so wss:// clients connect directly."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from clients import cli, ptt_events
from conftest import SAMPLE_WAV, SCRIPT
from servers import InProcessServer, SharedEngine
from tls import SelfSigned, self_signed

from voxtral_server.api.app import create_app
from voxtral_server.api.tls import TlsError, tls_options
from voxtral_server.config import ConfigError, ServerSettings, Settings
from voxtral_server.models.audio import read_audio_file
from voxtral_server.models.resample import resample
from voxtral_server.models.voxtral import VoxtralEngine

SPEECH = read_audio_file(SAMPLE_WAV)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> SelfSigned:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(scripted_engine: VoxtralEngine, cert: SelfSigned) -> Iterator[InProcessServer]:
    settings = Settings().with_overrides(
        {("server", "tls_cert"): str(cert.cert), ("server", "tls_key"): str(cert.key)}
    )
    app = create_app(settings, engine_factory=lambda s: SharedEngine(scripted_engine))
    with InProcessServer(app, **tls_options(settings.server)) as server:
        yield server


async def answer_over(url: str, context: ssl.SSLContext) -> str:
    """One push-to-talk turn on the sample clip: the words of the answer."""
    words: list[str] = []
    async with websockets.connect(url, ssl=context) as ws:
        for event in ptt_events():
            await ws.send(event)
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if event["type"] == "response.output_text.delta":
                words.append(event["delta"])
            elif event["type"] in ("response.done", "error"):
                assert event["type"] == "response.done", event
                return "".join(words)


@pytest.mark.asyncio
async def test_a_wss_session_works_for_a_client_that_trusts_the_certificate(
    tls_server: InProcessServer, cert: SelfSigned
) -> None:
    assert tls_server.realtime_url.startswith("wss://127.0.0.1:")
    assert await answer_over(tls_server.realtime_url, cert.client_context()) == SCRIPT
    async with httpx.AsyncClient(verify=cert.client_context()) as http:
        assert (await http.get(f"{tls_server.base_url}/healthz")).status_code == 200


@pytest.mark.asyncio
async def test_the_official_openai_client_connects_over_wss(
    tls_server: InProcessServer, cert: SelfSigned
) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="unused-locally", base_url=f"{tls_server.base_url}/v1")
    options: Any = {"ssl": cert.client_context()}
    words: list[str] = []
    async with client.realtime.connect(
        model="voxtral", websocket_connection_options=options
    ) as conn:
        event = await conn.recv()
        assert event.type == "session.created"
        assert event.session.audio.input.format.rate == 24000  # type: ignore[union-attr]
        # A push-to-talk turn as the SDK's users send it: PCM16 at 24 kHz, undeclared.
        await conn.session.update(
            session={"type": "realtime", "audio": {"input": {"turn_detection": None}}}
        )
        pcm = (np.clip(resample(SPEECH, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        async for event in conn:
            if event.type == "response.output_text.delta":
                words.append(event.delta)
            elif event.type in ("response.done", "error"):
                assert event.type == "response.done", event
                break
    assert "".join(words) == SCRIPT


@pytest.mark.asyncio
async def test_a_client_that_does_not_trust_it_is_refused(tls_server: InProcessServer) -> None:
    """It is real TLS: an unknown self-signed certificate fails verification."""
    with pytest.raises(ssl.SSLCertVerificationError):
        async with websockets.connect(tls_server.realtime_url, ssl=ssl.create_default_context()):
            pass


def test_tls_files_that_cannot_be_used_are_named(tmp_path: Path, cert: SelfSigned) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsError, match=r"certificate \(server.tls_cert\) .*missing.pem: no such"):
        tls_options(ServerSettings(tls_cert=str(missing), tls_key=str(cert.key)))
    with pytest.raises(TlsError, match=r"key \(server.tls_key\) .*missing.pem: no such file"):
        tls_options(ServerSettings(tls_cert=str(cert.cert), tls_key=str(missing)))
    with pytest.raises(TlsError, match="cannot read it"):
        tls_options(ServerSettings(tls_cert=str(tmp_path), tls_key=str(cert.key)))  # a folder
    other = self_signed(tmp_path / "other")
    with pytest.raises(TlsError, match="cannot be used together"):
        tls_options(ServerSettings(tls_cert=str(cert.cert), tls_key=str(other.key)))
    with pytest.raises(TlsError, match="cannot be used together"):
        tls_options(ServerSettings(tls_cert=str(cert.key), tls_key=str(cert.key)))  # not a cert
    with pytest.raises(ConfigError, match="tls_cert is set but tls_key is not"):
        Settings().with_overrides({("server", "tls_cert"): str(cert.cert)})
    assert tls_options(ServerSettings()) == {}


def test_serve_with_a_missing_certificate_says_which_and_exits(tmp_path: Path) -> None:
    missing = tmp_path / "server.crt"
    run = cli("serve", "--tls-cert", str(missing), "--tls-key", str(tmp_path / "server.key"))
    assert run.returncode == 2
    assert f"error: TLS certificate (server.tls_cert) {missing}: no such file" in run.stderr
