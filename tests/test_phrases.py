"""Phrase chunking for speech: early first audio, natural breaks, every word spoken once."""

from __future__ import annotations

import re

import pytest

from voxtral_server.models.phrases import PhraseChunker


def words(text: str) -> list[str]:
    """The word chunks the engine hands out for `text` (a word keeps the space before it)."""
    return re.findall(r"\s*\S+", text)


def run(text: str, chunker: PhraseChunker, step_s: float = 0.01) -> list[tuple[float, str]]:
    """Feed one word every `step_s`; phrases with the time they were released."""
    out: list[tuple[float, str]] = []
    now = 0.0
    for word in words(text):
        out += [(now, ph) for ph in chunker.feed(word, now)]
        now += step_s
    out += [(now, ph) for ph in chunker.flush()]
    return out


def test_sentences_are_phrases_and_nothing_is_lost() -> None:
    text = "Hello there. How are you today? I am fine!"
    phrases = [ph for _, ph in run(text, PhraseChunker(timeout_s=10))]
    assert phrases == ["Hello there.", " How are you today?", " I am fine!"]
    assert "".join(phrases) == text


def test_a_comma_ends_a_phrase_once_it_has_enough_words() -> None:
    text = "Well, the weather in Paris, as far as I know, is mild and sunny today."
    phrases = [ph for _, ph in run(text, PhraseChunker(2, 4, timeout_s=10))]
    # "Well," has 1 word: too short even for the first phrase; "the weather in Paris," ends
    # the first phrase (>= 2 words); later phrases need 4 words, so "as far as I know," does.
    assert phrases == [
        "Well, the weather in Paris,",
        " as far as I know,",
        " is mild and sunny today.",
    ]
    assert "".join(phrases) == text


def test_the_first_phrase_may_be_shorter_than_later_ones() -> None:
    phrases = [ph for _, ph in run("Sure, I can, of course, help.", PhraseChunker(1, 4, 10))]
    assert phrases[0] == "Sure,"
    assert phrases[1:] == [" I can, of course,", " help."]


def test_a_run_on_sentence_is_spoken_after_the_timeout_not_at_its_end() -> None:
    run_on = " ".join(f"word{i}" for i in range(40)) + "."
    timed = run(run_on, PhraseChunker(2, 4, timeout_s=0.25), step_s=0.0625)  # exact floats
    first_at, first = timed[0]
    assert first_at == 0.25  # not 2.5 s, when the sentence ends
    assert len(words(first)) == 5  # the words that arrived within the timeout
    assert "".join(ph for _, ph in timed) == run_on


def test_poll_releases_waiting_words_when_no_more_arrive() -> None:
    chunker = PhraseChunker(2, 4, timeout_s=0.2)
    assert chunker.feed("Thinking", 1.0) == []
    assert chunker.due_at() == pytest.approx(1.2)
    assert chunker.poll(1.1) == []
    assert chunker.poll(1.2) == ["Thinking"]
    assert chunker.due_at() is None and chunker.poll(5.0) == []


@pytest.mark.parametrize("text", ["Yes.", "OK", "No!", "Hmm…"])
def test_very_short_answers_are_spoken(text: str) -> None:
    assert [ph for _, ph in run(text, PhraseChunker())] == [text]


def test_unicode_punctuation_and_words() -> None:
    text = "東京は晴れです。 Grüße, naïve café — «très bien», merci!"
    phrases = [ph for _, ph in run(text, PhraseChunker(2, 2, timeout_s=10))]
    assert phrases[0] == "東京は晴れです。"
    assert phrases[1] == " Grüße, naïve café —"
    assert "".join(phrases) == text


def test_empty_input_gives_no_phrase() -> None:
    chunker = PhraseChunker()
    assert chunker.feed("", 0.0) == [] and chunker.feed("   ", 0.0) == []
    assert chunker.flush() == []


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        PhraseChunker(0, 4, 0.3)
    with pytest.raises(ValueError):
        PhraseChunker(2, 4, 0)
