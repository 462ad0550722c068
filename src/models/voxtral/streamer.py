"""From `generate`'s token stream to word chunks, on the worker thread, with no extra thread.

`WordStreamer` is a `TextIteratorStreamer` whose finalized text goes through the engine-neutral
`DeltaChunker` instead of a text queue; finished chunks go to the request's sink. It
timestamps the first generated token in `put()` (the base class only releases text at
whitespace, which would measure the first word instead). `CancelCriteria` ends `generate` at
the next decode step once the request's handle is cancelled.

Function calls: given the `[TOOL_CALLS]` token's id, the streamer hands out the words before
that token as usual and keeps everything after it out of the answer, as `call_text` (the
call's JSON, special tokens left out) for the engine to parse. `ToolCallGate` keeps the
model from calling when no tool is offered, or makes its answer start with a call when one
is required.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from transformers import LogitsProcessor, StoppingCriteria, TextIteratorStreamer

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
        tool_calls_token: int | None = None,
    ) -> None:
        """`tool_calls_token`: the `[TOOL_CALLS]` id when the request offers tools, else
        None (no call is looked for)."""
        TextIteratorStreamer.__init__(self, tokenizer, skip_prompt=True, skip_special_tokens=True)
        DeltaChunker.__init__(self, handle, chunker, chunk_timeout_s, sink, clock)
        # The base class's decoding state, declared here for the type checker.
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True
        self.tool_calls_token = tool_calls_token
        self._call_ids: list[int] | None = None  # generated after [TOOL_CALLS], once seen
        self.call_text: str | None = None  # set by end() if the model called a function

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
        if self._call_ids is not None:
            self._call_ids.extend(ids)
            return
        if self.tool_calls_token in ids:
            cut = ids.index(self.tool_calls_token)
            self._feed_ids(ids[:cut], now)
            self.end_text()  # the words before the call are the whole answer
            self._call_ids = ids[cut + 1 :]
            return
        self._feed_ids(ids, now)

    def _feed_ids(self, ids: list[int], now: float) -> None:
        if not ids:
            return
        self.token_cache.extend(ids)
        decoded = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if decoded.endswith("\ufffd"):
            return  # a multi-byte character is split across tokens: wait for the rest
        new_text = decoded[self.print_len :]
        self.print_len = len(decoded)
        self.feed_text(new_text, now)

    def end(self) -> None:
        self.end_text()
        if self._call_ids is not None and not self.cut_short:
            self.call_text = self.tokenizer.decode(self._call_ids, skip_special_tokens=True)
        self.token_cache = []
        self.print_len = 0
        self.next_tokens_are_prompt = True


class ToolCallGate(LogitsProcessor):  # type: ignore[misc]
    """Mode "forbid": `[TOOL_CALLS]` never comes (no tool is offered). Mode "force": the
    answer's first token is `[TOOL_CALLS]` (a call is required; the model writes the rest)."""

    def __init__(self, token_id: int, mode: Literal["forbid", "force"], prompt_len: int) -> None:
        self.token_id = token_id
        self.mode = mode
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.mode == "forbid":
            out = scores.clone()
            out[:, self.token_id] = -torch.inf
            return out
        if input_ids.shape[1] != self.prompt_len:  # past the first token
            return scores
        out = torch.full_like(scores, -torch.inf)
        out[:, self.token_id] = scores[:, self.token_id]
        return out


class CancelCriteria(StoppingCriteria):  # type: ignore[misc]
    """True once the handle is cancelled; `generate` checks it after every decode step."""

    def __init__(self, handle: RequestHandle) -> None:
        self.handle = handle

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = self.handle.cancelled
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
