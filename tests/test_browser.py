"""The web page in a real browser: headless Debian Chromium, a fake microphone playing a wav.

Each test saves a screenshot under $VOXTRAL_ARTIFACTS (default: build/test-artifacts/).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from browsers import (
    STATES_SEEN,
    fake_mic_page,
    first_answer,
    in_order,
    launch,
    needs_chromium,
    playwright_session,
    snap,
    within_ms,
)
from clients import ttft_lines
from conftest import SCRIPT
from coturn import coturn
from servers import running_server

from voxtral_server.config import Settings
from voxtral_server.models.voxtral import VoxtralEngine

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    with playwright_session() as p:
        yield p


@pytest.fixture
def browser(playwright: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh Chromium whose microphone plays the sample clip (in a loop)."""
    with fake_mic_page(playwright, request.node.name) as page:
        yield page


@pytest.fixture(scope="module")
def server(scripted_engine: VoxtralEngine) -> Iterator[str]:
    with running_server(Settings(), scripted_engine) as (url, _app):
        yield url


def test_webrtc_words_appear_in_order(browser: Any, server: str) -> None:
    with ttft_lines() as lines:
        _webrtc_words_appear_in_order(browser, server)
        # The page reported what the user saw; it is in the turn's log line.
        record = lines.wait_for(1)[0]
        assert record.transport == "webrtc" and record.client_first_word_ms is not None
        shown = browser.locator("[data-metric=browser_first_word_ms]").first.inner_text()
        assert abs(record.client_first_word_ms - int(shown.removesuffix(" ms"))) <= 1


def _webrtc_words_appear_in_order(browser: Any, server: str) -> None:
    browser.goto(server)
    browser.click("#connect")
    browser.wait_for_function("document.getElementById('badge').textContent === 'WebRTC'")
    assert first_answer(browser) == SCRIPT
    strip = browser.locator(".turn.bot .latency").first.inner_text()
    assert "you saw the first word after" in strip and "model TTFT" in strip
    assert "webrtc" in strip
    # The user's words, written down by the same model, fill the "You spoke" bubble (the
    # scripted checkpoint writes its one sentence whatever it hears).
    browser.wait_for_function(
        f"document.querySelector('.turn.user .bubble').textContent === {SCRIPT!r}",
        timeout=within_ms(30),
    )
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
        browser.click("#connect")
        browser.wait_for_function(
            "document.getElementById('badge').textContent.startsWith('WebSocket (fallback:')",
            timeout=within_ms(10),
        )
        badge = browser.inner_text("#badge")
        # The page gave up on WebRTC by itself, through its own client_timeout_ms timer or
        # ICE failing, not through a later error: the reason says which.
        timeout_ms = settings.webrtc.client_timeout_ms
        assert badge in (
            f"WebSocket (fallback: WebRTC did not connect within {timeout_ms} ms)",
            "WebSocket (fallback: WebRTC connection failed (ICE could not connect))",
        ), badge
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
        # Push-to-talk rests on "hold to talk", listens while held, and rests again once
        # the answer was stopped; a commit ends its turn.
        browser.wait_for_function("document.getElementById('state').dataset.state === 'idle'")
        seen = browser.evaluate(STATES_SEEN)
        assert in_order(seen, ["idle", "listening", "thinking", "speaking", "idle"]), seen
        assert "hearing" not in seen, seen  # no VAD in push-to-talk
        assert "ended by commit" in browser.locator(".turn.bot .latency").first.inner_text()
        snap(browser, "push-to-talk-cancelled")
        assert browser.console_errors == []


# Watches the page's playback without changing it: `heardAt` when the playback analyser
# (fftSize 512, player.js) first carries sound, polled here; `pageHeardAt` when the page's
# own check (player.level(), the source of "you heard it after") first saw sound; `doneAt`
# when the answer's latency strip (built at response.done) appeared.
HEARING_PROBE = """
(() => {
  const probe = (window.__hearing = { heardAt: null, pageHeardAt: null, doneAt: null });
  const rms = (data) => Math.sqrt(data.reduce((sum, v) => sum + v * v, 0) / data.length);
  const analysers = [];
  const create = BaseAudioContext.prototype.createAnalyser;
  BaseAudioContext.prototype.createAnalyser = function () {
    const node = create.call(this);
    analysers.push(node);
    return node;
  };
  const read = AnalyserNode.prototype.getFloatTimeDomainData;
  AnalyserNode.prototype.getFloatTimeDomainData = function (data) {
    read.call(this, data);
    if (this.fftSize === 512 && probe.pageHeardAt === null && rms(data) > 0.01) {
      probe.pageHeardAt = performance.now();
    }
  };
  const mine = new Float32Array(512);
  setInterval(() => {
    for (const node of analysers) {
      if (node.fftSize !== 512 || probe.heardAt !== null) continue;
      read.call(node, mine);
      if (rms(mine) > 0.01) probe.heardAt = performance.now();
    }
  }, 5);
  new MutationObserver(() => {
    if (probe.doneAt === null && document.querySelector(".turn.bot .latency")) {
      probe.doneAt = performance.now();
    }
  }).observe(document, { childList: true, subtree: true });
})();
"""


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="install espeak-ng")
@pytest.mark.parametrize("transport", ["webrtc", "websocket"])
def test_the_page_plays_the_spoken_answer(
    browser: Any, scripted_engine: VoxtralEngine, transport: str
) -> None:
    sections: dict[str, Any] = {"tts": {"engine": "espeak"}}
    if transport == "websocket":  # relay-only ICE with no TURN server: the page falls back
        sections["webrtc"] = {"ice_transport_policy": "relay"}
    settings = Settings.model_validate(sections)
    with ttft_lines() as lines, running_server(settings, scripted_engine) as (url, _app):
        browser.add_init_script(HEARING_PROBE)
        browser.goto(url)
        browser.click("#connect")
        browser.wait_for_function(
            f"document.getElementById('badge').className.includes('{transport}')",
            timeout=within_ms(10),
        )
        # The words being spoken are marked, and the page plays the answer: sound comes
        # out of its playback analyser.
        browser.wait_for_selector(".turn.bot .bubble .spoken", timeout=within_ms(30))
        first_answer(browser)
        browser.wait_for_function("window.__hearing.heardAt !== null")
        strip = browser.locator(".turn.bot .latency").first.inner_text()
        assert "server first audio" in strip
        spoken = browser.locator(".turn.bot .bubble .spoken").first.inner_text()
        assert SCRIPT.startswith(spoken) and spoken
        record = lines.wait_for(1)[0]
        assert record.transport == transport and record.ttfa_ms is not None
        # The page measures "you heard it after" until response.done builds the strip;
        # on a busy machine playback may start only after that. Order decides, not time:
        # heard before the strip, the figure is on it and in the turn's log line.
        probe = browser.evaluate("window.__hearing")
        if probe["pageHeardAt"] is not None and probe["pageHeardAt"] < probe["doneAt"]:
            assert "you heard it after" in strip
            assert record.client_first_audio_ms is not None
        else:
            assert "you heard it after" not in strip, probe
            assert record.client_first_audio_ms is None
        # "Speaking" from the first word (before any sound: speech is made from the words)
        # until response.done and the audio played out (then listening), or until the
        # looping microphone speaks over the answer (then hearing you: a barge-in).
        browser.wait_for_function(
            f"(() => {{ const s = {STATES_SEEN}; const i = s.indexOf('speaking');"
            " return i >= 0 && s.length > i + 1; })()"
        )
        log = browser.evaluate("window.__voxtralPage.conversation.log")
        seen = [entry["state"] for entry in log]
        assert in_order(seen, ["listening", "hearing", "thinking", "speaking"]), seen
        spoke = seen.index("speaking")
        after = log[spoke + 1]
        assert log[spoke]["at"] <= probe["heardAt"], log
        assert after["state"] == "hearing" or (
            after["state"] == "listening" and after["at"] >= probe["doneAt"]
        ), log
        snap(browser, f"speech-{transport}")
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


@pytest.fixture
def turn_server() -> Iterator[int]:
    with coturn("--lt-cred-mech", "--user", "voxtral:tunnel-secret") as port:
        yield port


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
                "document.getElementById('badge').textContent === 'WebRTC'", timeout=within_ms(15)
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
            "document.getElementById('badge').textContent === 'WebRTC'", timeout=within_ms(15)
        )
        # The microphone clip loops: the next turn is answered on the new connection.
        browser.wait_for_function(
            "document.querySelectorAll('.turn.bot .latency').length >= 2", timeout=within_ms(30)
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
    for selector in ("#connect", "#talk", "#cancel", "#mode", "#badge", "#state", "#end-of-turn"):
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
    context = launch(
        playwright,
        profile,
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
