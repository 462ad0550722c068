"""The page shows what the conversation is doing and how each turn ended (headless Chromium,
a fake microphone): listening -> thinking -> speaking -> listening, in words; the end of
turn and its silence in the latency strip, from the server's own figures; an answer taken
back when the speaker went on; and the end-of-turn choice in the settings.

Order is asserted, never time: the page logs every state change, and a test reads the log.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from browsers import (
    STATES_SEEN,
    fake_mic_page,
    first_answer,
    in_order,
    needs_chromium,
    playwright_session,
    snap,
)
from clients import ttft_lines
from conftest import SAMPLE_WAV, SCRIPT
from servers import running_server

from voxtral_server.config import Settings
from voxtral_server.models.turn.worker import JudgeWorker
from voxtral_server.models.voxtral import VoxtralEngine

pytestmark = needs_chromium

# What the user reads for each state (the words, not the colour, carry it).
LABELS = {
    "off": "Not connected",
    "idle": "Hold to talk",
    "listening": "Listening",
    "hearing": "Hearing you",
    "thinking": "Thinking…",
    "speaking": "Speaking",
}
# True once the page has gone back to listening after speaking.
BACK_TO_LISTENING = f"""(() => {{
  const seen = {STATES_SEEN};
  const spoke = seen.indexOf("speaking");
  return spoke >= 0 && seen.indexOf("listening", spoke) > spoke;
}})()"""
# Records whether the first-word figure was on screen before the full strip.
LIVE_PROBE = """
window.__live = [];
new MutationObserver(() => {
  const live = document.querySelector(".turn.bot .latency-live");
  if (live) window.__live.push(live.innerText);
}).observe(document, { childList: true, subtree: true });
"""


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    with playwright_session() as p:
        yield p


@pytest.fixture
def browser(playwright: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    with fake_mic_page(playwright, request.node.name) as page:
        yield page


@pytest.fixture(scope="module")
def server(scripted_engine: VoxtralEngine) -> Iterator[str]:
    with running_server(Settings(), scripted_engine) as (url, _app):
        yield url


def test_in_order_finds_subsequences_only() -> None:
    assert in_order(["off", "listening", "hearing", "thinking", "speaking"], ["off", "thinking"])
    assert not in_order(["thinking", "listening"], ["listening", "thinking"])


def shown_state(page: Any) -> tuple[str, str]:
    """(data-state, the words shown) of the state indicator, read at one instant."""
    got = page.evaluate("(e => [e.dataset.state, e.innerText])(document.getElementById('state'))")
    return got[0], got[1]


def strip_ms(strip: str, pattern: str) -> list[int]:
    found = re.search(pattern, strip)
    assert found, f"{pattern!r} not in the strip: {strip!r}"
    return [int(g) for g in found.groups()]


def test_the_state_goes_listening_thinking_speaking_listening(browser: Any, server: str) -> None:
    with ttft_lines() as lines:
        browser.add_init_script(LIVE_PROBE)
        browser.goto(server)
        state, words = shown_state(browser)
        assert (state, words) == ("off", LABELS["off"])
        browser.click("#connect")
        assert first_answer(browser) == SCRIPT
        browser.wait_for_function(BACK_TO_LISTENING)
        seen = browser.evaluate(STATES_SEEN)
        record = lines.wait_for(1)[0]
    assert in_order(seen, ["off", "listening", "hearing", "thinking", "speaking", "listening"]), (
        seen
    )
    assert set(seen) <= set(LABELS), seen
    state, words = shown_state(browser)
    assert words == LABELS[state]

    # How the turn ended and after how much silence, as the server measured it.
    strip = browser.locator(".turn.bot .latency").first.inner_text()
    assert record.silence_ms is not None
    if record.end_of_turn == "semantic":  # the default: the judge, or at most 500 ms
        (silence,) = strip_ms(strip, r"ended by the semantic judge after (\d+) ms of silence")
    else:
        assert record.end_of_turn == "silence", record
        (silence,) = strip_ms(strip, r"ended by (\d+) ms of silence")
    assert abs(silence - record.silence_ms) <= 1, (strip, record)
    assert record.first_word_ms is not None and record.speech_to_first_word_ms is not None
    commit, speech = strip_ms(
        strip, r"first word (\d+) ms after the end of turn, (\d+) ms after your speech"
    )
    assert (
        abs(commit - record.first_word_ms) <= 1
        and abs(speech - record.speech_to_first_word_ms) <= 1
    )
    # The browser's own figure showed with the first word, before response.done; the same
    # number stays on the strip.
    live = browser.evaluate("window.__live")
    (seen_ms,) = strip_ms(strip, r"you saw the first word after (\d+) ms")
    assert live and live[0] == f"you saw the first word after {seen_ms} ms", live
    snap(browser, "states-webrtc")
    assert browser.console_errors == []


def feed(page: Any, *events: dict[str, Any]) -> None:
    """Server events handed to the page's handler, as if they had arrived in this order."""
    page.evaluate(
        "(events) => events.forEach((e) => window.__voxtralPage.onEvent(e))", list(events)
    )


def timings(**fields: Any) -> dict[str, Any]:
    base = {
        "queue_wait_ms": 0.0,
        "model_ttft_ms": 30.0,
        "first_word_ms": 12.0,
        "total_ms": 80.0,
        "words": 2,
        "tokens": 4,
        "transport": "webrtc",
    }
    return base | fields


def answer(response_id: str, item_id: str, text: str) -> list[dict[str, Any]]:
    return [
        {"type": "response.created", "response": {"id": response_id, "status": "in_progress"}},
        {
            "type": "response.output_text.delta",
            "response_id": response_id,
            "item_id": item_id,
            "delta": text,
        },
    ]


def done(response_id: str, item_id: str, status: str, **timing: Any) -> dict[str, Any]:
    response: dict[str, Any] = {
        "id": response_id,
        "status": status,
        "output": [{"id": item_id, "type": "message", "role": "assistant"}],
    }
    if status == "cancelled":
        response["status_details"] = {"type": "cancelled", "reason": "turn_detected"}
    return {"type": "response.done", "response": response, "timings": timings(**timing)}


def test_transcribe_mode_says_transcribing_and_writing(browser: Any, server: str) -> None:
    browser.goto(server)  # not connected: the events below are the only ones
    browser.select_option("#mode", "transcribe")
    browser.evaluate("window.__voxtralPage.conversation.connected('listening')")
    feed(browser, {"type": "input_audio_buffer.committed", "item_id": "item_1"})
    assert shown_state(browser) == ("thinking", "Transcribing…")
    delta = "conversation.item.input_audio_transcription.delta"
    feed(browser, {"type": delta, "item_id": "item_1", "content_index": 0, "delta": "Hello"})
    assert shown_state(browser) == ("speaking", "Writing")
    assert browser.inner_text(".turn.bot .bubble") == "Hello"
    browser.select_option("#mode", "chat")
    assert shown_state(browser) == ("speaking", LABELS["speaking"])


@pytest.mark.parametrize("deleted_first", [True, False], ids=["deleted-first", "done-first"])
def test_an_answer_taken_back_is_struck_out_and_the_turn_stays_one(
    browser: Any, server: str, deleted_first: bool
) -> None:
    browser.goto(server)  # not connected: the events below are the only ones
    browser.evaluate("window.__voxtralPage.conversation.connected('listening')")
    item = "item_7"
    feed(
        browser,
        {"type": "input_audio_buffer.speech_started", "audio_start_ms": 300, "item_id": item},
        {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 1900, "item_id": item},
        {"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": None},
        *answer("resp_1", item, "Paris is"),
        # The speaker went on: the same item starts again, the answer is taken back.
        {"type": "input_audio_buffer.speech_started", "audio_start_ms": 2300, "item_id": item},
    )
    retracted = [
        {"type": "conversation.item.deleted", "item_id": item},
        done("resp_1", item, "cancelled", end_of_turn="semantic", silence_ms=200.0),
    ]
    feed(browser, *(retracted if deleted_first else retracted[::-1]))
    feed(
        browser,
        {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 3500, "item_id": item},
        {"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": None},
        *answer("resp_2", item, "Paris next Tuesday, then."),
        done(
            "resp_2",
            item,
            "completed",
            end_of_turn="semantic",
            silence_ms=200.0,
            speech_to_first_word_ms=260.0,
            speculative=True,
        ),
    )
    assert browser.locator(".turn.user").count() == 1
    assert browser.inner_text(".turn.user .bubble") == "You spoke (went on after a pause)"
    bots = browser.locator(".turn.bot")
    assert bots.count() == 2
    taken_back = bots.nth(0)
    classes = taken_back.get_attribute("class").split()
    assert "retracted" in classes and "cancelled" not in classes
    assert taken_back.locator(".note").inner_text() == "taken back: you went on speaking"
    struck = "getComputedStyle(document.querySelector('.turn.bot.retracted .bubble'))"
    assert browser.evaluate(f"{struck}.textDecorationLine") == "line-through"
    kept = bots.nth(1)
    assert "retracted" not in kept.get_attribute("class").split()
    assert kept.locator(".bubble").inner_text() == "Paris next Tuesday, then."
    strip = kept.locator(".latency").inner_text()
    assert "ended by the semantic judge after 200 ms of silence" in strip
    assert "first word 12 ms after the end of turn, 260 ms after your speech" in strip
    assert "started during the pause" in strip
    seen = browser.evaluate(STATES_SEEN)
    assert in_order(
        seen,
        [
            "listening",
            "hearing",
            "thinking",
            "speaking",
            "hearing",
            "thinking",
            "speaking",
            "listening",
        ],
    ), seen
    snap(browser, f"retracted-{'deleted-first' if deleted_first else 'done-first'}")
    assert browser.console_errors == []


def clip(tmp_path: Path, *parts: tuple[str, float]) -> Path:
    """A microphone clip: ("speech", _) is the sample clip up to the end of its speech (2.7 s,
    with its 0.3 s lead), ("silence", seconds) that much silence."""
    audio, rate = sf.read(SAMPLE_WAV, dtype="int16")
    pieces = [
        audio[: int(2.7 * rate)] if kind == "speech" else np.zeros(int(seconds * rate), np.int16)
        for kind, seconds in parts
    ]
    path = tmp_path / "mic.wav"
    sf.write(path, np.concatenate(pieces), rate, subtype="PCM_16")
    return path


@pytest.fixture
def long_pause_wav(tmp_path: Path) -> Path:
    """The sample clip's speech followed by 3 s of silence: longer than semantic_vad's
    longest wait at eagerness high (2 s), so the turn ends before the clip loops."""
    return clip(tmp_path, ("speech", 0), ("silence", 3))


def test_semantic_end_of_turn_chosen_in_the_page(
    playwright: Any, server: str, long_pause_wav: Path, request: pytest.FixtureRequest
) -> None:
    with (
        ttft_lines() as lines,
        fake_mic_page(playwright, request.node.name, long_pause_wav) as page,
    ):
        page.goto(server)
        page.select_option("#end-of-turn", "semantic_vad:high")
        page.click("#connect")
        assert first_answer(page) == SCRIPT
        record = lines.wait_for(1)[0]
        td = page.evaluate("window.__voxtral.sessionTurnDetection")
        assert td["type"] == "semantic_vad" and td["eagerness"] == "high"
        assert page.input_value("#end-of-turn") == "semantic_vad:high"
        # Whichever way the server ended the turn (the judge, or the longest wait), the
        # strip says so with the silence it measured.
        strip = page.locator(".turn.bot .latency").first.inner_text()
        assert record.end_of_turn in ("semantic", "silence") and record.silence_ms is not None
        pattern = {
            "semantic": r"ended by the semantic judge after (\d+) ms of silence",
            "silence": r"ended by (\d+) ms of silence",
        }[record.end_of_turn]
        (silence,) = strip_ms(strip, pattern)
        assert abs(silence - record.silence_ms) <= 1, (strip, record)
        snap(page, "semantic-chosen")
        assert page.console_errors == []


def test_a_refused_end_of_turn_choice_is_shown_and_the_previous_one_kept(
    browser: Any, scripted_engine: VoxtralEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import voxtral_server.api.state as server_state

    # A server without the turn judge (as without pipecat-ai installed).
    monkeypatch.setattr(server_state, "load_judge", lambda kind, required: (None, "not installed"))
    with running_server(Settings(), scripted_engine) as (url, _app):
        browser.goto(url)
        browser.click("#connect")
        browser.wait_for_function("window.__voxtral.sessionTurnDetection?.type === 'server_vad'")
        browser.select_option("#end-of-turn", "semantic_vad:low")
        browser.wait_for_selector("#notice:not([hidden])")
        assert "Semantic end of turn is not available" in browser.inner_text("#notice")
        browser.wait_for_function("document.getElementById('end-of-turn').value === 'server_vad'")
        # The conversation goes on with the silence timer.
        assert first_answer(browser) == SCRIPT
        strip = browser.locator(".turn.bot .latency").first.inner_text()
        assert re.search(r"ended by \d+ ms of silence", strip), strip
        snap(browser, "semantic-refused")


class SureJudge:
    """A turn judge that always hears a finished sentence: every pause ends the turn."""

    name = "sure"

    def completeness(self, audio: np.ndarray) -> float:
        return 0.99


# True once an answer was taken back and a later answer to the same turn is complete.
REVISED_AND_ANSWERED = """(() => {
  const turns = [...document.querySelectorAll(".turn")];
  const struck = turns.findIndex((t) => t.matches(".bot.retracted"));
  return struck >= 0 && turns.slice(struck + 1).some(
    (t) => t.matches(".bot:not(.retracted)") && t.querySelector(".latency"));
})()"""
# The turns on screen up to the first answer kept after one taken back: [role, item, classes].
UP_TO_THE_KEPT_ANSWER = """(() => {
  const out = [];
  let struck = false;
  for (const t of document.querySelectorAll(".turn")) {
    out.push([t.classList.contains("user") ? "user" : "bot", t.dataset.item, t.className]);
    struck ||= t.matches(".bot.retracted");
    if (struck && t.matches(".bot:not(.retracted)") && t.querySelector(".latency")) break;
  }
  return out;
})()"""


def test_a_turn_the_speaker_went_on_with_is_answered_once(
    playwright: Any,
    scripted_engine: VoxtralEngine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    import voxtral_server.api.state as server_state

    # The judge ends the turn 100 ms into the pause (eagerness high; its verdict may come
    # late on a loaded machine, not 700 ms late). The speech goes on 0.8 s after it stopped
    # (0.5 s of silence, then the clip's 0.3 s lead): within vad.revision_window_ms (1 s, in
    # audio, whatever the load), so the server takes that answer back.
    monkeypatch.setattr(
        server_state, "load_judge", lambda kind, required: (JudgeWorker(SureJudge()), None)
    )
    wav = clip(tmp_path, ("speech", 0), ("silence", 0.5), ("speech", 0), ("silence", 3))
    with (
        ttft_lines() as lines,
        running_server(Settings(), scripted_engine) as (url, _app),
        fake_mic_page(playwright, request.node.name, wav) as page,
    ):
        page.goto(url)
        page.select_option("#end-of-turn", "semantic_vad:high")
        page.click("#connect")
        page.wait_for_function(REVISED_AND_ANSWERED)
        turns = page.evaluate(UP_TO_THE_KEPT_ANSWER)
        records = lines.wait_for(2)
        # One user turn, its answer(s) taken back struck out, then the answer kept: all
        # about the same item.
        assert [role for role, _, _ in turns].count("user") == 1, turns
        assert turns[0][0] == "user" and len({item for _, item, _ in turns}) == 1, turns
        assert all("retracted" in classes for _, _, classes in turns[1:-1]), turns
        kept = page.locator(".turn.bot:not(.retracted) .latency").first.inner_text()
        (silence,) = strip_ms(kept, r"ended by the semantic judge after (\d+) ms of silence")
        semantic = [r for r in records if r.end_of_turn == "semantic" and r.silence_ms is not None]
        assert any(abs(silence - r.silence_ms) <= 1 for r in semantic), (kept, records)
        assert sum(r.retracted or 0 for r in records) >= 1, records
        snap(page, "revised-live")
        assert page.console_errors == []


def test_the_users_words_fill_the_you_spoke_bubble(browser: Any, server: str) -> None:
    browser.goto(server)  # not connected: the events below are the only ones
    browser.evaluate("window.__voxtralPage.conversation.connected('listening')")
    feed(browser, {"type": "input_audio_buffer.committed", "item_id": "item_1"})
    assert browser.inner_text(".turn.user .bubble") == "You spoke"
    delta = "conversation.item.input_audio_transcription.delta"
    feed(
        browser,
        *answer("resp_1", "item_1", "Paris."),
        {"type": delta, "item_id": "item_1", "content_index": 0, "delta": "What is"},
        {"type": delta, "item_id": "item_1", "content_index": 0, "delta": " the capital?"},
    )
    assert browser.inner_text(".turn.user .bubble") == "What is the capital?"
    completed = "conversation.item.input_audio_transcription.completed"
    feed(browser, {"type": completed, "item_id": "item_1", "transcript": "What's the capital?"})
    assert browser.inner_text(".turn.user .bubble") == "What's the capital?"
    assert browser.inner_text(".turn.bot .bubble") == "Paris."  # the answer is untouched
