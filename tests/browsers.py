"""Headless Debian Chromium for the page's tests: a fake microphone playing a wav, console
errors collected, a screenshot of the end state under $VOXTRAL_ARTIFACTS
(default: build/test-artifacts/). Shared by the browser test files."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SAMPLE_WAV
from patience import scaled

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("VOXTRAL_ARTIFACTS", REPO / "build" / "test-artifacts"))

needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian chromium is not installed (apt-get install chromium)",
)


def within_ms(base_s: float) -> float:
    """A playwright wait (ms): `base_s` on a quiet machine, stretched with the load (at most
    6x). It bounds how long a test waits for the page, never what the page must achieve."""
    return scaled(base_s, 6 * base_s) * 1000


def launch(playwright: Any, profile: str, args: list[str], **options: Any) -> Any:
    """Debian's Chromium with `profile`; a clear failure naming it if it does not start."""
    timeout = within_ms(30)
    try:
        return playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=args, timeout=timeout, **options
        )
    except Exception as exc:  # playwright's Error or TimeoutError: say what did not start
        pytest.fail(
            f"Chromium ({CHROMIUM}) did not start within {timeout / 1000:.0f} s "
            f"(30 s x load, cap 180 s): {exc}",
            pytrace=False,
        )


@contextmanager
def playwright_session() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@contextmanager
def fake_mic_page(playwright: Any, name: str, wav: Path = SAMPLE_WAV) -> Iterator[Any]:
    """A page in a fresh Chromium whose microphone plays `wav` (in a loop); its console
    errors in `page.console_errors`; a screenshot `<name>-end.png` when it closes."""
    profile = tempfile.mkdtemp(prefix="voxtral-chromium-")
    context = launch(
        playwright,
        profile,
        viewport={"width": 1000, "height": 700},
        args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",
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
    page.set_default_timeout(within_ms(30))  # every wait without its own bound
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    try:
        yield page
    finally:
        snap(page, f"{name}-end")
        context.close()
        shutil.rmtree(profile, ignore_errors=True)


def snap(page: Any, name: str) -> None:
    """A screenshot of the page as the user sees it now (the artifact reviewers look at)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def first_answer(page: Any) -> str:
    """The first answer's text, once its latency strip (built at response.done) is there."""
    page.wait_for_selector(".turn.bot .latency", timeout=within_ms(30))
    return str(page.locator(".turn.bot .bubble").first.inner_text())


# The page's conversation states so far, in order (static/js/state.js keeps the log).
STATES_SEEN = "window.__voxtralPage.conversation.log.map((e) => e.state)"


def in_order(seen: Sequence[str], wanted: Sequence[str]) -> bool:
    """`wanted` appears in `seen` in this order (other states may come between)."""
    rest = iter(seen)
    return all(any(state == want for state in rest) for want in wanted)
