"""From `generate`'s token stream to word chunks, on the worker thread, with no extra thread.

`WordStreamer` is a `TextIteratorStreamer` whose finalized text goes through the word
chunker instead of a text queue; finished chunks go to the request's sink. It timestamps the
first generated token in `put()` (the base class only releases text at whitespace, which
would measure the first word instead), and flushes text that has waited longer than the
chunk timeout when the next token arrives, so a run without whitespace cannot hold back the
first chunk. `CancelCriteria` ends `generate` at the next decode step once the request's
handle is cancelled. `DeltaChunker`, the text half of `WordStreamer` (deltas -> chunks -> sink,
the chunk timeout, no delta after cancel), is shared with the vLLM engine; `final_chunk` derives
every engine's closing `Totals` the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import StoppingCriteria, TextIteratorStreamer

from .types import Chunk, EngineError, RequestHandle, Status, Totals, ms_between
from .words import WordChunker

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


class WordStreamer(TextIteratorStreamer, DeltaChunker):  # type: ignore[misc]
    def __init__(
        self,
        tokenizer: Any,
        handle: RequestHandle,
        chunker: WordChunker,
        chunk_timeout_s: float,
        sink: ChunkSink,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        TextIteratorStreamer.__init__(self, tokenizer, skip_prompt=True, skip_special_tokens=True)
        DeltaChunker.__init__(self, handle, chunker, chunk_timeout_s, sink, clock)
        # The base class's decoding state, declared here for the type checker.
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        now = self.clock()
        ids = value.reshape(-1).tolist()
        self.mark_tokens(len(ids), now)
        self.token_ids.extend(ids)
        if self.handle.cancelled:
            self.cut_short = True
            return  # generation stops at the next step; nothing more is handed out
        self.token_cache.extend(ids)
        decoded = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if decoded.endswith("\ufffd"):
            return  # a multi-byte character is split across tokens: wait for the rest
        new_text = decoded[self.print_len :]
        self.print_len = len(decoded)
        self.feed_text(new_text, now)

    def end(self) -> None:
        self.end_text()
        self.token_cache = []
        self.print_len = 0
        self.next_tokens_are_prompt = True


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


class CancelCriteria(StoppingCriteria):  # type: ignore[misc]
    """True once the handle is cancelled; `generate` checks it after every decode step."""

    def __init__(self, handle: RequestHandle) -> None:
        self.handle = handle

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = self.handle.cancelled
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
