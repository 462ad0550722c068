"""From `generate`'s token stream to word chunks, on the worker thread, with no extra thread.

`WordStreamer` is a `TextIteratorStreamer` whose finalized text goes through the word
chunker instead of a text queue; finished chunks go to the request's sink. It timestamps the
first generated token in `put()` (the base class only releases text at whitespace, which
would measure the first word instead), and flushes text that has waited longer than the
chunk timeout when the next token arrives, so a run without whitespace cannot hold back the
first chunk. `CancelCriteria` ends `generate` at the next decode step once the request's
handle is cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import StoppingCriteria, TextIteratorStreamer

from .types import Chunk, RequestHandle, ms_between
from .words import WordChunker

ChunkSink = Callable[[Chunk], None]


class WordStreamer(TextIteratorStreamer):  # type: ignore[misc]
    def __init__(
        self,
        tokenizer: Any,
        handle: RequestHandle,
        chunker: WordChunker,
        chunk_timeout_s: float,
        sink: ChunkSink,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.clock = clock
        # The base class's decoding state, declared here for the type checker.
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True
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

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        now = self.clock()
        if self.first_token_at is None:
            self.first_token_at = now
        ids = value.reshape(-1).tolist()
        self.tokens += len(ids)
        self.handle.tokens = self.tokens
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

    def end(self) -> None:
        if self.handle.cancelled:
            self.cut_short = True
        else:
            self._emit(self.chunker.flush())
        self.token_cache = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

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


class CancelCriteria(StoppingCriteria):  # type: ignore[misc]
    """True once the handle is cancelled; `generate` checks it after every decode step."""

    def __init__(self, handle: RequestHandle) -> None:
        self.handle = handle

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = self.handle.cancelled
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
