"""Word chunking: what a listener sees, delta by delta."""

from __future__ import annotations

import pytest
import torch

from voxtral_server.models.chunking import WordChunker
from voxtral_server.models.types import Chunk, Request, RequestHandle
from voxtral_server.models.voxtral.streamer import WordStreamer


def run(chunker: WordChunker, pieces: list[str]) -> list[str]:
    out: list[str] = []
    for piece in pieces:
        out += chunker.feed(piece)
    return out + chunker.flush()


def test_one_word_per_chunk_as_soon_as_whitespace_follows() -> None:
    chunker = WordChunker()
    assert chunker.feed("Hel") == []
    assert chunker.feed("lo wo") == ["Hello"]
    assert chunker.feed("rld ") == [" world"]
    assert chunker.flush() == []


def test_deltas_concatenate_to_the_text() -> None:
    text = "Hello world,  the quick\nbrown fox."
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    chunks = run(WordChunker(), pieces)
    assert "".join(chunks) == text
    assert [c.strip() for c in chunks] == text.split()


def test_punctuation_stays_with_its_word() -> None:
    assert run(WordChunker(), ["Yes, it works! Does it? ", "(Really.)"]) == [
        "Yes,",
        " it",
        " works!",
        " Does",
        " it?",
        " (Really.)",
    ]


def test_unicode_words() -> None:
    text = "héllo wörld — naïve café 日本語 テスト ok"
    chunks = run(WordChunker(), [text[i : i + 2] for i in range(0, len(text), 2)])
    assert [c.strip() for c in chunks] == text.split()


def test_eos_flushes_the_last_word_without_trailing_space() -> None:
    chunker = WordChunker()
    assert chunker.feed("the end") == ["the"]
    assert chunker.flush() == [" end"]


def test_leading_whitespace_of_the_answer_is_dropped() -> None:
    assert run(WordChunker(), ["  hi there"]) == ["hi", " there"]


def test_min_and_max_words_per_chunk() -> None:
    chunker = WordChunker(min_words=2, max_words=3)
    assert chunker.feed("a ") == []
    assert chunker.feed("b c d e f g ") == ["a b c", " d e f"]
    assert chunker.pending == " g "
    assert chunker.flush() == [" g"]


def test_seed_behaviour_six_words() -> None:
    # The original system's 6-word chunks, kept as the benchmarks' baseline.
    chunker = WordChunker(min_words=6, max_words=6)
    assert chunker.feed("one two three four five ") == []
    assert chunker.feed("six seven") == ["one two three four five six"]


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        WordChunker(min_words=3, max_words=2)


class _CharTokenizer:
    """Token id = a character's code point; enough for the streamer's decode calls."""

    def decode(self, ids: list[int], **kwargs: object) -> str:
        return "".join(chr(i) for i in ids)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _streamer(clock: _Clock, timeout_s: float = 0.15) -> tuple[WordStreamer, list[Chunk]]:
    import numpy as np

    chunks: list[Chunk] = []
    handle = RequestHandle(Request(np.zeros(160, np.float32)), submitted_at=clock.now)
    streamer = WordStreamer(
        _CharTokenizer(), handle, WordChunker(), timeout_s, chunks.append, clock=clock
    )
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, skipped
    return streamer, chunks


def _put(streamer: WordStreamer, text: str) -> None:
    for ch in text:
        streamer.put(torch.tensor([ord(ch)]))


def test_text_without_spaces_is_flushed_after_the_timeout() -> None:
    clock = _Clock()
    streamer, chunks = _streamer(clock)
    _put(streamer, "日本語の")
    assert chunks == []  # held: the word may go on
    clock.now += 0.2  # longer than chunk_timeout_ms
    _put(streamer, "文")
    assert [c.text for c in chunks] == ["日本語の文"]
    _put(streamer, "章 done ")
    streamer.end()
    assert "".join(c.text for c in chunks) == "日本語の文章 done"


def test_first_token_is_timestamped_at_the_token_not_the_word() -> None:
    clock = _Clock()
    streamer, chunks = _streamer(clock, timeout_s=1.0)
    clock.now += 0.040
    _put(streamer, "lo")  # first token, no word yet
    clock.now += 0.500
    _put(streamer, "ng ")
    assert len(chunks) == 1
    assert chunks[0].first_token_latency_ms == pytest.approx(40.0)
    assert chunks[0].processing_time_ms == pytest.approx(540.0)
    assert chunks[0].tokens == 5


def test_a_pause_between_tokens_loses_no_whitespace() -> None:
    clock = _Clock()
    streamer, chunks = _streamer(clock)
    _put(streamer, "Hello.\n")
    clock.now += 0.3  # longer than the timeout, with only whitespace held
    _put(streamer, "\nWorld again")
    clock.now += 0.3
    _put(streamer, "!")  # a timeout with a word held releases it, keeps nothing back
    streamer.end()
    assert "".join(c.text for c in chunks) == "Hello.\n\nWorld again!"
    assert streamer.text == "Hello.\n\nWorld again!"


def test_timeout_release_keeps_trailing_space_for_the_next_word() -> None:
    chunker = WordChunker(min_words=3, max_words=3)
    assert chunker.feed("one two ") == []
    assert chunker.flush(end=False) == ["one two"]
    assert chunker.pending == " "
    assert chunker.feed("three four") == []
    assert chunker.flush() == [" three four"]


def test_nothing_is_handed_out_after_cancel() -> None:
    clock = _Clock()
    streamer, chunks = _streamer(clock)
    _put(streamer, "one two ")
    streamer.handle.cancel()
    _put(streamer, "three ")
    streamer.end()
    assert [c.text for c in chunks] == ["one", " two"]
    assert streamer.cut_short
