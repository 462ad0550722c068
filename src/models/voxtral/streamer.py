"""From `generate`'s token stream to word chunks, on the worker thread, with no extra thread.

`WordStreamer` is a `TextIteratorStreamer` whose finalized text goes through the engine-neutral
`DeltaChunker` instead of a text queue; finished chunks go to the request's sink. It
timestamps the first generated token in `put()` (the base class only releases text at
whitespace, which would measure the first word instead). `CancelCriteria` ends `generate` at
the next decode step once the request's handle is cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import StoppingCriteria, TextIteratorStreamer

from ..chunking import ChunkSink, DeltaChunker, WordChunker
from ..types import RequestHandle


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
        """`generate`'s call: the prompt first (skipped), then each new token."""
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.put_ids(value.reshape(-1).tolist())

    def put_ids(self, ids: list[int]) -> None:
        """New tokens of the answer (a batched decode loop's call: no prompt first)."""
        now = self.clock()
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


class CancelCriteria(StoppingCriteria):  # type: ignore[misc]
    """True once the handle is cancelled; `generate` checks it after every decode step."""

    def __init__(self, handle: RequestHandle) -> None:
        self.handle = handle

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = self.handle.cancelled
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
