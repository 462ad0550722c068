"""Word chunking: what a listener sees, delta by delta."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from voxtral_server.models.chunking import DeltaChunker, WordChunker
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
    _put(streamer, "!")  # "again" may go on: the timeout does not release it
    streamer.end()
    assert "".join(c.text for c in chunks) == "Hello.\n\nWorld again!"
    assert streamer.text == "Hello.\n\nWorld again!"


def test_timeout_release_keeps_trailing_space_for_the_next_word() -> None:
    chunker = WordChunker(min_words=3, max_words=3)
    assert chunker.feed("one two ") == []
    assert chunker.flush_unspaced() == ["one two"]
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


TIMEOUT_S = 0.15
SLOW_S = 0.2  # every delta arrives after the chunk timeout: a CPU under load


def _deltas(timed: list[tuple[float, str]], chunker: WordChunker | None = None) -> list[str]:
    """Feed `(now, text)` deltas to a `DeltaChunker`, end the answer, return the chunks."""
    chunks: list[Chunk] = []
    handle = RequestHandle(Request(np.zeros(160, np.float32)), submitted_at=0.0)
    stream = DeltaChunker(
        handle, chunker or WordChunker(), TIMEOUT_S, chunks.append, clock=lambda: 0.0
    )
    for now, text in timed:
        stream.feed_text(text, now)
    stream.end_text()
    assert stream.text == "".join(c.text for c in chunks)
    return [c.text for c in chunks]


def _slow(pieces: list[str]) -> list[str]:
    return _deltas([(SLOW_S * (i + 1), piece) for i, piece in enumerate(pieces)])


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (["la", "z", "y", " dog"], ["lazy", " dog"]),
        (["Hel", "lo", "!"], ["Hello!"]),
        (["The", " qu", "i", "ck", " fox", "."], ["The", " quick", " fox."]),
        (["https://ex", "ample", ".com/a", "?b=1"], ["https://example.com/a?b=1"]),
        (["안녕", "하세", "요 여", "러분"], ["안녕하세요", " 여러분"]),  # Korean uses spaces
    ],
    ids=["lazy", "hello!", "quick", "url", "korean"],
)
def test_a_slow_clock_never_splits_a_word(pieces: list[str], expected: list[str]) -> None:
    assert _slow(pieces) == expected


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (["你", "好", "世", "界"], ["你好", "世界"]),
        (["こんに", "ちは", "、世", "界！"], ["こんにちは", "、世界！"]),
        (["สวั", "สดี", "ครับ"], ["สวัสดี", "ครับ"]),
    ],
    ids=["chinese", "japanese", "thai"],
)
def test_text_without_spaces_still_flushes_on_the_timeout(
    pieces: list[str], expected: list[str]
) -> None:
    # Passes on the old rule too: it pins that words staying whole did not cost CJK or Thai
    # text its timeout.
    assert _slow(pieces) == expected


def test_mixed_text_flushes_the_cjk_part_and_holds_a_latin_word() -> None:
    assert _slow(["我", "喜欢", "Py", "th", "on", " 很", "好"]) == ["我喜欢", "Python", " 很好"]


def test_a_latin_word_goes_out_with_the_cjk_text_that_ends_it() -> None:
    # The held word has waited past the timeout, so the CJK character after it releases both.
    assert _slow(["Py", "th", "on", "我", "喜欢"]) == ["Python我", "喜欢"]


def test_a_timeout_release_keeps_the_held_word_and_its_space() -> None:
    chunker = WordChunker(min_words=3, max_words=3)
    assert chunker.feed("one two thr") == []
    assert chunker.flush_unspaced() == ["one two"]
    assert chunker.pending == " thr"
    chunker = WordChunker()
    assert chunker.feed("我喜欢Py") == []
    assert chunker.flush_unspaced() == ["我喜欢"]
    assert chunker.pending == "Py"
    chunker = WordChunker()
    assert chunker.feed("中\ufe0e") == []
    assert chunker.flush_unspaced() == ["中\ufe0e"]  # the variation selector stays with 中


SAMPLES = [
    "The quick brown fox jumps over the lazy dog. Hello! Isn't it 12,345.67 km/h?",
    "héllo wörld — naïve café,\n\nsee https://example.com/a?b=1 (really).",
    "我喜欢Python和Rust。你呢？ OK, 好的 thanks",
    "こんにちは、世界！ Voxtral です。\u3000また ね",
    "สวัสดีครับ ผมชื่อ Voxtral ครับ",
    "안녕하세요 여러분, 반갑습니다!",
]
# The scripts in SAMPLES written without spaces: Han, Kana, Thai, CJK and full-width punctuation.
_NO_SPACES = re.compile("[\u0e00-\u0e7f\u3001-\u30ff\u4e00-\u9fff\uff01-\uff64]")


@pytest.mark.parametrize(
    "text", SAMPLES, ids=["english", "accents", "chinese", "japanese", "thai", "korean"]
)
@pytest.mark.parametrize(("min_words", "max_words"), [(1, 1), (2, 3)])
def test_random_splits_and_timings_keep_the_text_and_its_words(
    text: str, min_words: int, max_words: int
) -> None:
    rng = random.Random(f"{text}{min_words}")
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, len(text) // 2)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        now = 0.0
        timed = []
        for piece in pieces:
            now += rng.choice([0.01, 0.05, SLOW_S])
            timed.append((now, piece))
        chunks = _deltas(timed, WordChunker(min_words, max_words))
        assert "".join(chunks) == text
        at = 0
        for chunk in chunks[:-1]:
            at += len(chunk)
            # A chunk ends before whitespace or after a character of a script without spaces.
            assert text[at].isspace() or _NO_SPACES.match(text[at - 1]), (chunks, at)


def test_the_streamer_never_splits_a_word_on_a_slow_clock() -> None:
    clock = _Clock()
    streamer, chunks = _streamer(clock)
    for ch in "Hello! The lazy dog":
        clock.now += SLOW_S
        _put(streamer, ch)
    streamer.end()
    assert [c.text for c in chunks] == ["Hello!", " The", " lazy", " dog"]
