"""The web page in a real browser: headless Debian Chromium, a fake microphone playing a wav.

Each test saves a screenshot under $VOXTRAL_ARTIFACTS (default: build/test-artifacts/).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clients import TtftLines
from conftest import REPO, SAMPLE_WAV, SCRIPT
from servers import running_server

from voxtral_server.config import Settings
from voxtral_server.models.voxtral import VoxtralEngine

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("VOXTRAL_ARTIFACTS", REPO / "build" / "test-artifacts"))

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian chromium is not installed (apt-get install chromium)",
)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture
def browser(playwright: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh Chromium whose microphone plays the sample clip (in a loop)."""
    profile = tempfile.mkdtemp(prefix="voxtral-chromium-")
    context = playwright.chromium.launch_persistent_context(
        profile,
        executable_path=CHROMIUM,
        headless=True,
        viewport={"width": 1000, "height": 700},
        args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={SAMPLE_WAV}",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--autoplay-policy=no-user-gesture-required",
        ],
    )
    page = context.pages[0] if context.pages else context.new_page()
    page.console_errors = []  # type: ignore[attr-defined]
    page.on(
        "console",
        lambda m: m.type == "error" and page.console_errors.append(m.text),  # type: ignore[attr-defined]
    )
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        snap(page, f"{request.node.name}-end")
        context.close()
        shutil.rmtree(profile, ignore_errors=True)


def snap(page: Any, name: str) -> None:
    """A screenshot of the page as the user sees it now (the artifact reviewers look at)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def first_answer(page: Any, within_ms: int = 30_000) -> str:
    page.wait_for_selector(".turn.bot .latency", timeout=within_ms)
    return str(page.locator(".turn.bot .bubble").first.inner_text())


@pytest.fixture(scope="module")
def server(scripted_engine: VoxtralEngine) -> Iterator[str]:
    with running_server(Settings(), scripted_engine) as (url, _app):
        yield url


def test_webrtc_words_appear_in_order(browser: Any, server: str) -> None:
    import logging

    from voxtral_server.api.metrics import TTFT_LOGGER

    lines = TtftLines()
    logging.getLogger(TTFT_LOGGER).addHandler(lines)
    logging.getLogger(TTFT_LOGGER).setLevel(logging.INFO)
    try:
        _webrtc_words_appear_in_order(browser, server)
        # The page reported what the user saw; it is in the turn's log line.
        record = lines.wait_for(1)[0]
        assert record.transport == "webrtc" and record.client_first_word_ms is not None
        shown = browser.locator("[data-metric=browser_first_word_ms]").first.inner_text()
        assert abs(record.client_first_word_ms - int(shown.removesuffix(" ms"))) <= 1
    finally:
        logging.getLogger(TTFT_LOGGER).removeHandler(lines)


def _webrtc_words_appear_in_order(browser: Any, server: str) -> None:
    browser.goto(server)
    browser.click("#connect")
    browser.wait_for_function("document.getElementById('badge').textContent === 'WebRTC'")
    assert first_answer(browser) == SCRIPT
    strip = browser.locator(".turn.bot .latency").first.inner_text()
    assert "you saw the first word after" in strip and "model TTFT" in strip
    assert "webrtc" in strip
    seen_ms = browser.locator("[data-metric=browser_first_word_ms]").first.inner_text()
    assert seen_ms.endswith("ms") and seen_ms != "– ms"
    snap(browser, "webrtc")
    assert browser.console_errors == []


def test_falls_back_to_the_websocket_when_webrtc_cannot_connect(
    browser: Any, scripted_engine: VoxtralEngine
) -> None:
    # Relay-only ICE with no TURN server: the browser has no candidate, ICE cannot complete.
    settings = Settings.model_validate({"webrtc": {"ice_transport_policy": "relay"}})
    with running_server(settings, scripted_engine) as (url, _app):
        browser.goto(url)
        started = browser.evaluate("performance.now()")
        browser.click("#connect")
        browser.wait_for_function(
            "document.getElementById('badge').textContent.startsWith('WebSocket (fallback:')",
            timeout=10_000,
        )
        fell_back_ms = browser.evaluate("performance.now()") - started
        badge = browser.inner_text("#badge")
        assert fell_back_ms < 5000, f"fallback took {fell_back_ms:.0f} ms"
        assert "WebRTC" in badge  # the reason names what failed
        assert first_answer(browser) == SCRIPT
        assert "websocket" in browser.locator(".turn.bot .latency").first.inner_text()
        snap(browser, "fallback")
        assert browser.console_errors == []


@pytest.fixture(scope="module")
def long_answer_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VoxtralEngine]:
    from conftest import engine_settings

    from voxtral_server.models.tiny import build_tiny

    script = " ".join(f"word{i}" for i in range(200))
    model = build_tiny(tmp_path_factory.mktemp("tiny-long-ui"), script=script)
    engine = VoxtralEngine.load(
        engine_settings(model, model={"max_new_tokens": 1200}, chunked_response={})
    )
    yield engine
    engine.close()


def test_push_to_talk_from_the_keyboard_and_cancel_from_the_button(
    browser: Any, long_answer_engine: VoxtralEngine
) -> None:
    with running_server(Settings(), long_answer_engine) as (url, _app):
        browser.goto(url)
        browser.check("input[name=turns][value=ptt]")
        browser.click("#connect")
        browser.wait_for_function("document.getElementById('badge').textContent === 'WebRTC'")
        browser.wait_for_selector("#talk:not([disabled])")
        browser.focus("body")
        browser.keyboard.down("Space")
        browser.wait_for_selector("#talk.held")
        browser.wait_for_timeout(2500)  # the user speaks while holding the key
        browser.keyboard.up("Space")
        browser.wait_for_selector(".turn.user")
        browser.wait_for_function(
            "document.querySelector('.turn.bot .bubble')?.textContent.includes('word3')"
        )
        assert browser.locator(".turn.user").count() == 1  # no VAD turn in push-to-talk
        browser.click("#cancel")
        browser.wait_for_selector(".turn.bot.cancelled .latency")
        text = browser.locator(".turn.bot .bubble").first.inner_text()
        assert text.startswith("word0 word1 word2 word3") and "word199" not in text
        assert browser.is_disabled("#cancel")
        snap(browser, "push-to-talk-cancelled")
        assert browser.console_errors == []


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="install espeak-ng")
@pytest.mark.parametrize("transport", ["webrtc", "websocket"])
def test_the_page_plays_the_spoken_answer(
    browser: Any, scripted_engine: VoxtralEngine, transport: str
) -> None:
    import logging

    from voxtral_server.api.metrics import TTFT_LOGGER

    sections: dict[str, Any] = {"tts": {"engine": "espeak"}}
    if transport == "websocket":  # relay-only ICE with no TURN server: the page falls back
        sections["webrtc"] = {"ice_transport_policy": "relay"}
    lines = TtftLines()
    logging.getLogger(TTFT_LOGGER).addHandler(lines)
    logging.getLogger(TTFT_LOGGER).setLevel(logging.INFO)
    try:
        with running_server(Settings.model_validate(sections), scripted_engine) as (url, _app):
            browser.goto(url)
            browser.click("#connect")
            browser.wait_for_function(
                f"document.getElementById('badge').className.includes('{transport}')",
                timeout=10_000,
            )
            # The playback analyser heard the answer, and the words being spoken are marked.
            browser.wait_for_selector(".turn.bot .bubble .spoken", timeout=30_000)
            first_answer(browser)
            strip = browser.locator(".turn.bot .latency").first.inner_text()
            # "you heard it after" appears once the playback's AnalyserNode measured sound.
            assert "you heard it after" in strip and "server first audio" in strip
            spoken = browser.locator(".turn.bot .bubble .spoken").first.inner_text()
            assert SCRIPT.startswith(spoken) and spoken
            record = lines.wait_for(1)[0]
            assert record.transport == transport
            assert record.ttfa_ms is not None and record.client_first_audio_ms is not None
            snap(browser, f"speech-{transport}")
    finally:
        logging.getLogger(TTFT_LOGGER).removeHandler(lines)
    assert browser.console_errors == []


class Forwarder:
    """What `ssh -L PORT:localhost:TARGET` does: a local TCP port forwarded to another."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target = target_port
        self.bytes = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._closed = False
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                self.bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(2)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._socks:
            s.close()


def _own_ipv4() -> str:
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                return ip.ip
    pytest.skip("no non-loopback IPv4 address for the TURN relay")


@pytest.fixture
def turn_server() -> Iterator[int]:
    """coturn listening on TCP only (no UDP port is assumed on the way to the GPU host)."""
    import subprocess

    from servers import free_port

    turnserver = shutil.which("turnserver")
    if turnserver is None:
        pytest.skip("coturn is not installed (apt-get install coturn)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="voxtral-turn-")
    proc = subprocess.Popen(
        [
            turnserver, "-n", "--no-udp", "--no-tls", "--no-dtls", "--no-cli",
            "-L", "127.0.0.1", "-p", str(port), "--relay-ip", _own_ipv4(),
            "--lt-cred-mech", "--user", "voxtral:tunnel-secret", "--realm", "voxtral",
            "--log-file", "stdout", "--simple-log", "--pidfile", f"{workdir}/turn.pid",
            "--db", f"{workdir}/turndb", "--min-port", "49152", "--max-port", "49999",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:  # its own word that the listeners are up
        if "Total General servers" in line:
            break
    else:
        pytest.fail("turnserver exited before it was ready")
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_webrtc_through_an_ssh_tunnel_via_tcp_turn(
    browser: Any, scripted_engine: VoxtralEngine, turn_server: int
) -> None:
    turn_tunnel = Forwarder(turn_server)  # ssh -L 3478:localhost:3478
    ice = [
        {
            "urls": [f"turn:127.0.0.1:{turn_tunnel.port}?transport=tcp"],
            "username": "voxtral",
            "credential": "tunnel-secret",
        }
    ]
    settings = Settings.model_validate(
        {"webrtc": {"ice_servers": ice, "ice_transport_policy": "relay", "client_timeout_ms": 8000}}
    )
    with running_server(settings, scripted_engine) as (url, _app):
        http_tunnel = Forwarder(int(url.rsplit(":", 1)[1]))  # ssh -L 8000:localhost:8000
        try:
            browser.goto(f"http://127.0.0.1:{http_tunnel.port}/")
            browser.click("#connect")
            browser.wait_for_function(
                "document.getElementById('badge').textContent === 'WebRTC'", timeout=15_000
            )
            assert first_answer(browser) == SCRIPT
            snap(browser, "tunnel-turn")
            assert turn_tunnel.bytes > 0  # media and events went through the relay
            assert browser.console_errors == []
        finally:
            http_tunnel.close()
            turn_tunnel.close()


def test_reconnects_by_itself_after_a_drop(browser: Any, scripted_engine: VoxtralEngine) -> None:
    import asyncio

    with running_server(Settings(), scripted_engine) as (url, app):
        browser.goto(url)
        browser.click("#connect")
        assert first_answer(browser) == SCRIPT
        # The server drops every peer connection (as a restart or a network blip would).
        asyncio.run_coroutine_threadsafe(
            app.state.server.peers.close(), app.state.server_loop
        ).result(10)
        browser.wait_for_function(
            "document.getElementById('badge').textContent.startsWith('Reconnecting')"
        )
        browser.wait_for_function(
            "document.getElementById('badge').textContent === 'WebRTC'", timeout=15_000
        )
        # The microphone clip loops: the next turn is answered on the new connection.
        browser.wait_for_function(
            "document.querySelectorAll('.turn.bot .latency').length >= 2", timeout=30_000
        )
        assert browser.locator(".turn.bot .bubble").nth(1).inner_text() == SCRIPT
        assert browser.console_errors == []


def test_usable_at_375_px(browser: Any, server: str) -> None:
    browser.set_viewport_size({"width": 375, "height": 740})
    browser.goto(server)
    browser.click("#connect")
    assert first_answer(browser) == SCRIPT
    width = browser.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"page is {width} px wide: it scrolls sideways"
    for selector in ("#connect", "#talk", "#cancel", "#mode", "#badge"):
        box = browser.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, selector
    snap(browser, "mobile-375px")


def test_clear_message_when_the_server_is_unreachable(browser: Any, server: str) -> None:
    browser.goto(server)
    browser.route("**/v1/client-config", lambda route: route.abort("connectionrefused"))
    browser.click("#connect")
    browser.wait_for_selector("#notice:not([hidden])")
    assert "cannot be reached" in browser.inner_text("#notice")
    assert browser.inner_text("#badge") == "Server unreachable"


def test_clear_message_when_the_microphone_is_denied(playwright: Any, server: str) -> None:
    profile = tempfile.mkdtemp(prefix="voxtral-chromium-")
    # No fake-UI flag: the permission prompt is answered "block".
    context = playwright.chromium.launch_persistent_context(
        profile,
        executable_path=CHROMIUM,
        headless=True,
        args=["--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream",
              "--deny-permission-prompts", "--disable-background-networking"],
    )  # fmt: skip
    try:
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(server)
        page.click("#connect")
        page.wait_for_selector("#notice:not([hidden])")
        assert "permission was denied" in page.inner_text("#notice")
        assert page.inner_text("#badge") == "No microphone"
        snap(page, "microphone-denied")
    finally:
        context.close()
        shutil.rmtree(profile, ignore_errors=True)
