"""Streamed text -> whole-word chunks handed to a sink: the engine-neutral text path.

`WordChunker` (pure, no clock): a chunk's text is a delta, so concatenating every chunk of an
answer gives the answer's text and a word keeps the whitespace before it (" world,"). A word
is complete once whitespace follows it. `flush()` releases everything held (the answer
ended, or the caller's timeout fired because text kept arriving without whitespace).

`DeltaChunker` (every engine): text deltas of one answer -> chunks -> the request's sink,
with the chunk timeout and nothing handed out after cancel. `final_chunk` derives every
engine's closing `Totals` the same way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from .types import Chunk, EngineError, RequestHandle, Status, Totals, ms_between

_WORD = re.compile(r"\s*\S+")


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

    def flush(self, end: bool = True) -> list[str]:
        """Release every word held, complete or not.

        `end=True`: the text is over; trailing whitespace is dropped. `end=False` (a
        timeout): trailing whitespace stays held, to lead the next word.
        """
        kept = ""
        if not end:
            body = self._pending.rstrip()
            kept = self._pending[len(body) :]
            self._pending = body
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
    `feed_text()` takes new answer text, `end_text()` flushes the last words. Text that has
    waited longer than the chunk timeout without whitespace is flushed when the next delta
    arrives. Nothing is handed out once the handle is cancelled (`cut_short` then says so).
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
        if self.chunker.pending.strip():
            if self._pending_since is None or chunks:
                self._pending_since = now
            elif now - self._pending_since >= self.chunk_timeout_s:
                chunks += self.chunker.flush(end=False)
                self._pending_since = None
        else:
            self._pending_since = None  # only whitespace waits: nothing to show yet
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
) -> Chunk:
    """The one final chunk of an answer, its `Totals` derived the same way for every engine.

    `stream`/`started` are None if the request never ran (cancelled while queued, engine
    closed); `started` is when the engine picked it up, `now` when generation stopped.
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
