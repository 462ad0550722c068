"""Streamed text -> whole-word chunks handed to a sink: the engine-neutral text path.

`WordChunker` (pure, no clock): a chunk's text is a delta, so concatenating every chunk of an
answer gives the answer's text and a word keeps the whitespace before it (" world,"). A word
is complete once whitespace follows it. `flush()` releases everything held (the answer ended).
`flush_unspaced()` is for the caller's timeout, when text keeps arriving without whitespace:
it releases only what cannot split a word of a language written with spaces (see
`unspaced_end`), so "laz" + "y" never becomes two chunks while "你好世界" is not held back.

`DeltaChunker` (every engine): text deltas of one answer -> chunks -> the request's sink,
with the chunk timeout and nothing handed out after cancel. `final_chunk` derives every
engine's closing `Totals` the same way.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable

from .types import Chunk, EngineError, RequestHandle, Status, ToolCall, Totals, ms_between

_WORD = re.compile(r"\s*\S+")
# Greedy: ends at the last non-space character that whitespace follows (the last whole word).
_LAST_COMPLETE_WORD = re.compile(r".*\S(?=\s)", re.DOTALL)
# Characters of scripts written without spaces between words, and the punctuation written
# with them. Hangul is not here: Korean separates words with spaces. U+3000 (ideographic
# space) is not here either: it is whitespace, so it already ends a word.
_UNSPACED = (
    "["
    "\u0e00-\u0e7f"  # Thai
    "\u0e80-\u0eff"  # Lao
    "\u0f00-\u0fff"  # Tibetan
    "\u1000-\u109f\ua9e0-\ua9ff\uaa60-\uaa7f"  # Myanmar
    "\u1780-\u17ff\u19e0-\u19ff"  # Khmer
    "\u1950-\u19df\u1a20-\u1aaf\uaa80-\uaadf"  # Tai Le, New Tai Lue, Tai Tham, Tai Viet
    "\u2e80-\u2fdf"  # CJK and Kangxi radicals
    "\u3001-\u303f"  # CJK symbols and punctuation: 、。「」々
    "\u3040-\u30ff\u31f0-\u31ff\U0001b000-\U0001b16f"  # Hiragana, Katakana
    "\u3100-\u312f\u31a0-\u31bf"  # Bopomofo
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # Han
    "\U00020000-\U0002fa1f\U00030000-\U000323af"  # Han, supplementary planes
    "\ua000-\ua4cf"  # Yi
    "\ufe10-\ufe1f\ufe30-\ufe4f"  # vertical and CJK compatibility punctuation
    "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff64"  # full-width punctuation: ，！？
    "\uff65-\uff9f"  # half-width Katakana
    "]"
)
# Greedy: ends after the last such character.
_THROUGH_LAST_UNSPACED = re.compile(".*" + _UNSPACED, re.DOTALL)


def unspaced_end(text: str) -> int:
    """Where `text` may be cut on a timeout without splitting a word; 0 if nowhere.

    The cut follows the last whole word (a word whitespace follows) or the last character of
    a script written without spaces (Han, Kana, Thai, Lao, Khmer, Myanmar, Tibetan, ..., and
    CJK/full-width punctuation), whichever comes later, with the combining marks after it.
    A word of a language written with spaces ("laz", "Hello!") is never cut: it waits for
    whitespace or the end of the text. "我喜欢Python" is cut after "欢".
    """
    match = _LAST_COMPLETE_WORD.match(text)
    cut = match.end() if match else 0
    match = _THROUGH_LAST_UNSPACED.match(text, cut)
    if match:
        cut = match.end()
        while cut < len(text) and unicodedata.category(text[cut]).startswith("M"):
            cut += 1  # a variation selector or mark belongs to its character
    return cut


class WordChunker:
    def __init__(self, min_words: int = 1, max_words: int = 1) -> None:
        if not 1 <= min_words <= max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
        self.min_words = min_words
        self.max_words = max_words
        self._pending = ""
        self._started = False

    @property
    def pending(self) -> str:
        """Text received but not yet released."""
        return self._pending

    def feed(self, text: str) -> list[str]:
        """Add streamed text; return the chunks that are now complete."""
        self._pending += text
        return self._take(final=False)

    def flush(self) -> list[str]:
        """The text is over: release every word held, complete or not.

        Trailing whitespace is dropped.
        """
        return self._take(final=True)

    def flush_unspaced(self) -> list[str]:
        """Release what a timeout may release: held text up to `unspaced_end(pending)`.

        Whole words held for `min_words` and text of scripts written without spaces go out
        (`max_words` still applies); a word that may continue ("laz", "Hello!") and the
        whitespace that will lead the next word stay held.
        """
        cut = unspaced_end(self._pending)
        kept = self._pending[cut:]
        self._pending = self._pending[:cut]
        chunks = self._take(final=True)
        self._pending = kept
        return chunks

    def _take(self, final: bool) -> list[str]:
        # Matches are contiguous from offset 0 (`\s*` absorbs the gaps).
        words: list[str] = []
        for match in _WORD.finditer(self._pending):
            if not final and match.end() == len(self._pending):
                break  # no whitespace after it yet: the word may continue
            words.append(match.group())
        chunks: list[str] = []
        while words and (final or len(words) >= self.min_words):
            take = min(self.max_words, len(words))
            chunks.append("".join(words[:take]))
            words = words[take:]
        released = sum(len(c) for c in chunks)
        self._pending = "" if final else self._pending[released:]
        if chunks and not self._started:
            chunks[0] = chunks[0].lstrip()  # an answer does not start with whitespace
            self._started = True
        return [c for c in chunks if c]


ChunkSink = Callable[[Chunk], None]


class DeltaChunker:
    """Text deltas of one answer -> word chunks handed to the sink (both engines use it).

    `mark_tokens()` records generated tokens (the first one's time is the model's TTFT),
    `feed_text()` takes new answer text, `end_text()` flushes the last words. When held text
    has waited longer than the chunk timeout, the next delta releases what
    `WordChunker.flush_unspaced()` allows: text of scripts written without spaces (CJK, Thai,
    ...), never part of a word of a language written with spaces, which waits for whitespace
    or `end_text()`. Nothing is handed out once the handle is cancelled (`cut_short` then
    says so).
    """

    def __init__(
        self,
        handle: RequestHandle,
        chunker: WordChunker,
        chunk_timeout_s: float,
        sink: ChunkSink,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.clock = clock
        self.handle = handle
        self.chunker = chunker
        self.chunk_timeout_s = chunk_timeout_s
        self.sink = sink
        self.first_token_at: float | None = None
        self.tokens = 0
        self.chunks = 0
        self.text = ""  # everything handed out
        self.cut_short = False  # cancel stopped text from being handed out
        self.token_ids: list[int] = []
        self._pending_since: float | None = None

    def mark_tokens(self, count: int, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
        self.tokens += count
        self.handle.tokens = self.tokens

    def feed_text(self, new_text: str, now: float) -> None:
        if self.handle.cancelled:
            self.cut_short = True
            return
        chunks = self.chunker.feed(new_text)
        if not self.chunker.pending.strip():
            self._pending_since = None  # only whitespace waits: nothing to show yet
        elif self._pending_since is None or chunks:
            self._pending_since = now  # what is held now starts waiting
        elif now - self._pending_since >= self.chunk_timeout_s:
            released = self.chunker.flush_unspaced()
            if released:  # else the held word keeps its age: unspaced text after it goes at once
                chunks += released
                self._pending_since = now if self.chunker.pending.strip() else None
        self._emit(chunks)

    def end_text(self) -> None:
        if self.handle.cancelled:
            self.cut_short = True
        else:
            self._emit(self.chunker.flush())

    def _emit(self, texts: list[str]) -> None:
        for text in texts:
            if self.handle.cancelled:  # cancel() returned: no delta may follow it
                self.cut_short = True
                return
            now = self.clock()
            submitted = self.handle.submitted_at
            first = (
                None if self.first_token_at is None else ms_between(submitted, self.first_token_at)
            )
            self.sink(
                Chunk(text, self.chunks, False, first, ms_between(submitted, now), self.tokens)
            )
            self.text += text  # only what the sink accepted counts as handed out
            self.chunks += 1


def final_chunk(
    handle: RequestHandle,
    stream: DeltaChunker | None,
    error: EngineError | None,
    started: float | None,
    now: float,
    tool_calls: tuple[ToolCall, ...] = (),
) -> Chunk:
    """The one final chunk of an answer, its `Totals` derived the same way for every engine.

    `stream`/`started` are None if the request never ran (cancelled while queued, engine
    closed); `started` is when the engine picked it up, `now` when generation stopped.
    `tool_calls`: the functions the model called (kept only if the answer completed).
    """
    status: Status
    if error is not None:
        status = "error"
    elif stream is None or stream.cut_short:
        status = "cancelled"
    else:
        status = "completed"  # a cancel that came after the last word changes nothing
    tokens = stream.tokens if stream else 0
    first = stream.first_token_at if stream else None
    answer = stream.text if stream else ""
    queue_wait_ms = ms_between(handle.submitted_at, started if started is not None else now)
    gen_s = (now - first) if first is not None else 0.0
    cancel_ms = None
    if status == "cancelled" and started is not None and handle.cancel_requested_at:
        cancel_ms = ms_between(max(handle.cancel_requested_at, started), now)
    totals = Totals(
        status=status,
        answer=answer,
        tokens=tokens,
        words=len(answer.split()),
        total_ms=ms_between(handle.submitted_at, now),
        tokens_per_s=round((tokens - 1) / gen_s, 1) if tokens > 1 and gen_s > 0 else 0.0,
        queue_wait_ms=queue_wait_ms,
        model_ttft_ms=(
            ms_between(handle.submitted_at, first) - queue_wait_ms if first is not None else None
        ),
        cancel_latency_ms=cancel_ms,
        tokens_after_cancel=(
            tokens - handle.tokens_at_cancel
            if handle.tokens_at_cancel is not None and started is not None
            else None
        ),
        error_code=error.code if error else None,
        error=str(error) if error else None,
        token_ids=tuple(stream.token_ids) if stream else (),
        tool_calls=tool_calls if status == "completed" else (),
    )
    return Chunk(
        text="",
        chunk_index=stream.chunks if stream else 0,
        is_final=True,
        first_token_latency_ms=ms_between(handle.submitted_at, first)
        if first is not None
        else None,
        processing_time_ms=totals.total_ms,
        tokens=tokens,
        totals=totals,
    )
