"""Continuous batching: many answers share each decode step of the model, on the worker thread.

A fixed number of slots (`engine.max_batch`), each a row of one static KV cache (`SlotCache`).
Every turn of the loop:

1. takes waiting requests into free slots (confirmed ones first, in submission order, then
   speculative ones; the engine's queue decides, `VoxtralEngine._admit`);
2. ends slots whose request was cancelled (cancel, barge-in, close, preemption): within one
   decode step, the other slots untouched;
3. prefills new requests before the next decode step (first word first), confirmed ones
   before speculative ones, oldest first, at
   most `engine.prefill_chunk_tokens` prompt tokens per turn, so a long prompt is cut into
   chunks and the running answers never wait for more than one chunk; a prompt's last chunk
   gives its first token at once;
4. runs one decode step for every slot that is answering: one token each, each at its own
   position, then each answer's own `TokenPicker` (its settings, its random generator), its
   own `WordStreamer` (the same chunks as the serial worker), and its own end (EOS, token
   budget). A slot frees as soon as its answer ends, and a waiting request takes it at the
   next turn.

The decode step runs over rows 0 .. b-1, b the smallest bucket (1, 2, 4, 8, 16, ...,
`max_batch`) that holds every answering slot (a new request takes the free row that still
holds the most of its prompt, from its conversation's previous turn, else the lowest), so a
compiled step has one shape per bucket: compiled and, on CUDA, recorded as CUDA graphs at
start-up (`warm_up`), never while serving. A request fails alone: an exception in its prompt,
prefill or delivery ends that request with an error; only a failing decode step (which all
answering slots share) fails them all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ...config import Settings
from ..chunking import ChunkSink
from ..steps import StepObserver
from ..types import EngineError, Request, RequestHandle
from .load import Runtime
from .picker import TokenPicker
from .prefix import RowMemory, shared_prefix
from .slots import SlotCache, slot_cache_bytes
from .streamer import ToolCallGate, WordStreamer

logger = logging.getLogger(__name__)

_KV_LEN_STEP = 64  # uncompiled decode reads the cache up to the longest row, in these steps
_MIN_REUSE = 16  # fewer shared tokens (BOS, [INST], ...) are not worth another row's memory


@dataclass(frozen=True, eq=False)
class Job:
    """A submitted request and where its chunks go."""

    handle: RequestHandle
    sink: ChunkSink


class Host(Protocol):
    """What the loop needs from its engine (`VoxtralEngine`): the queue, the prompt, the
    word streamer, the final chunk."""

    settings: Settings
    model: Any
    runtime: Runtime

    def _admit(self, free: int, wait: bool) -> list[Job] | None: ...

    def _release(
        self, job: Job, streamer: WordStreamer | None, error: EngineError | None,
        started: float | None,
    ) -> None: ...  # fmt: skip

    def _streamer(self, handle: RequestHandle, sink: ChunkSink) -> WordStreamer: ...

    def _tool_gate(self, request: Request, prompt_len: int) -> list[ToolCallGate]: ...

    def model_inputs(self, request: Request) -> dict[str, torch.Tensor]: ...

    def _generate(self, handle: RequestHandle, streamer: WordStreamer) -> None: ...

    def _max_cache_len(self) -> int: ...

    def _sync(self) -> None: ...


def decode_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a decode step runs at: powers of two below `max_batch`, then `max_batch`."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return (*sizes, max_batch)


@dataclass(eq=False)
class Slot:
    """One running request in one row of the cache."""

    job: Job
    row: int = -1  # its row of the KV cache, from the start of its prefill
    started: float | None = None  # its prefill began (the end of its queue wait)
    streamer: WordStreamer | None = None
    picker: TokenPicker | None = None
    embeds: torch.Tensor | None = None  # the prompt, while it is being prefilled
    prompt_embeds: torch.Tensor | None = None  # the whole prompt (kept for the row's memory)
    prefilled: int = 0  # prompt positions already in the cache
    position: int = 0  # where the next token's keys go
    token: int = 0  # the latest token: the next decode step's input

    @property
    def handle(self) -> RequestHandle:
        return self.job.handle

    @property
    def answering(self) -> bool:
        return self.picker is not None and self.embeds is None


class BatchLoop:
    def __init__(self, engine: Host) -> None:
        self.engine = engine
        self.model = engine.model
        self.runtime = engine.runtime
        settings = engine.settings
        self.max_batch = settings.engine.max_batch
        self.chunk_tokens = settings.engine.prefill_chunk_tokens
        self.length = engine._max_cache_len()
        self.buckets = decode_buckets(self.max_batch)
        on_cuda = self.runtime.device.type == "cuda"
        if self.runtime.compile and not on_cuda and len(self.buckets) > 1:
            # One graph with a symbolic batch size serves every bucket on CPU, but a size of 1
            # would be specialised and compiled apart (tens of seconds): start at 2.
            self.buckets = self.buckets[1:]
        text = self.model.config.get_text_config(decoder=True)
        self.cache = SlotCache(
            text, self.max_batch, self.length, self.runtime.dtype, self.runtime.device
        )
        logger.info(
            "continuous batching: %d slots x %d positions, KV cache %.1f MiB, decode buckets %s",
            self.max_batch,
            self.length,
            slot_cache_bytes(text, self.max_batch, self.length, self.runtime.dtype) / 2**20,
            list(self.buckets),
        )
        self.slots: list[Slot] = []  # every running request, in admission order
        self.rows: list[Slot | None] = [None] * self.max_batch  # who holds each KV row
        # What a free row still holds from its last answer: a conversation's next turn
        # starts its prefill after the part it shares (`prefix.py`).
        self.memory: list[RowMemory | None] = [None] * self.max_batch
        self.reused_tokens = 0  # prompt tokens not prefilled again, since start-up
        self._audio_token_id = int(self.model.config.audio_token_id)
        self.observer: StepObserver | None = None
        self._warming = False  # serving warm-up requests: nobody waits for their end
        self._step: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] = self._decode
        if self.runtime.compile:
            # CUDA: one graph per bucket (CUDA graphs need fixed shapes anyway). CPU: one graph
            # with a symbolic batch size, compiled once instead of twice (tens of seconds each).
            self._step = torch.compile(
                self._decode, mode=self.runtime.compile_mode, dynamic=not on_cuda
            )

    # ----------------------------------------------------------------- the loop

    @property
    def busy(self) -> bool:
        return bool(self.slots)

    @property
    def free(self) -> int:
        return self.max_batch - len(self.slots)

    def run(self) -> None:
        """Serve until the engine closes, then end every slot (each ends cancelled)."""
        while True:
            jobs = self.engine._admit(self.free, wait=not self.busy)
            if jobs is None:
                for slot in self._active():
                    self._end(slot, None)
                return
            self.admit(jobs)
            try:
                self.step()
            except Exception as exc:  # a bug here must not stop the worker: fail what runs
                for slot in self._active():
                    self._fail(slot, exc)

    def admit(self, jobs: list[Job]) -> None:
        self.slots.extend(Slot(job) for job in jobs)

    def step(self) -> None:
        """One turn: end cancelled slots, prefill (up to one chunk), one decode step."""
        for slot in self._active():
            if slot.handle.cancelled:
                self._end(slot, None)
        self._prefill()
        self._decode_step()

    def _active(self) -> list[Slot]:
        """Occupied slots in the order their prompts are prefilled: confirmed requests
        first, speculative ones last, each kind oldest first."""
        return sorted(
            self.slots, key=lambda slot: (slot.handle.speculative, slot.handle.submitted_at)
        )

    # ----------------------------------------------------------------- prefill

    def _prefill(self) -> None:
        budget = self.chunk_tokens
        t0 = time.perf_counter()
        done = 0
        for slot in self._active():
            if budget <= 0:
                break
            if slot.answering:
                continue
            try:
                spent = self._prefill_slot(slot, budget)
            except Exception as exc:  # this request only
                self._fail(slot, exc)
                continue
            budget -= spent
            done += spent
        if done and self.observer is not None:
            self.engine._sync()
            self.observer.prefill_step(time.perf_counter() - t0, done)

    def _prefill_slot(self, slot: Slot, budget: int) -> int:
        """Prefill up to `budget` prompt tokens of this slot; the tokens it took."""
        engine = self.engine
        if slot.embeds is None:
            slot.started = time.perf_counter()
            request = slot.handle.request
            slot.streamer = engine._streamer(slot.handle, slot.job.sink)
            with torch.inference_mode():
                inputs = engine.model_inputs(request)
            ids = inputs["input_ids"]
            max_new = request.max_new_tokens or engine.settings.model.max_new_tokens
            if ids.shape[1] + max_new > self.length:
                return self._serve_alone(slot, ids.shape[1], max_new)
            gate = engine._tool_gate(request, ids.shape[1])
            slot.picker = TokenPicker(self.model, request, ids, max_new, engine.settings.chat, gate)
            slot.embeds = slot.prompt_embeds = inputs["inputs_embeds"]
            self._take_row(slot, ids[0].cpu().numpy())
        embeds = slot.embeds
        start = slot.prefilled
        end = min(embeds.shape[1], start + budget)
        with torch.inference_mode():
            out = self.model(
                inputs_embeds=embeds[:, start:end],
                position_ids=torch.arange(start, end, device=embeds.device).unsqueeze(0),
                cache=self.cache.prefill(slot.row, start),
                use_cache=True,
                logits_to_keep=1,
            )
            slot.prefilled = end
            if end == embeds.shape[1]:  # the whole prompt is in: its first token
                slot.embeds = None
                slot.position = end
                assert slot.picker is not None
                token = slot.picker.pick(out.logits[0, -1].float())
                self._deliver(slot, int(token))
        return end - start

    def _serve_alone(self, slot: Slot, prompt_len: int, max_new: int) -> int:
        """A prompt + answer longer than a slot: served by `generate` on its own (the
        other answers wait for it; the settings that bound a prompt make this rare)."""
        logger.warning(
            "request=%s prompt of %d tokens + %d new exceeds a slot (%d): served alone",
            slot.handle.request.id,
            prompt_len,
            max_new,
            self.length,
        )
        assert slot.streamer is not None
        self.engine._generate(slot.handle, slot.streamer)  # ends the streamer itself
        self.slots.remove(slot)
        self.engine._release(slot.job, slot.streamer, None, slot.started)
        return prompt_len

    def _take_row(self, slot: Slot, ids: np.ndarray) -> None:
        """Give the slot the free row that already holds most of its prompt (else a free
        row holding nothing, else the lowest); its prefill starts after what is shared."""
        assert slot.prompt_embeds is not None
        best, best_shared = -1, -1
        for row, holder in enumerate(self.rows):
            if holder is not None:
                continue
            memory = self.memory[row]
            shared = 0
            if memory is not None:
                shared = shared_prefix(memory, ids, slot.prompt_embeds, self._audio_token_id)
                shared = shared if shared >= _MIN_REUSE else 0
            # More shared wins; then a row that remembers nothing (keep others' memories).
            if (shared, memory is None) > (best_shared, best >= 0 and self.memory[best] is None):
                best, best_shared = row, shared
        slot.row = best
        self.rows[best] = slot
        self.memory[best] = None
        # At least the prompt's last token is run again: it gives the first token's logits.
        slot.prefilled = min(best_shared, ids.shape[0] - 1)
        self.reused_tokens += slot.prefilled

    # ----------------------------------------------------------------- decode

    def _decode_step(self) -> None:
        answering = [slot for slot in self._active() if slot.answering]
        if not answering:
            return
        t0 = time.perf_counter()
        rows = self._bucket(max(slot.row for slot in answering) + 1)
        tokens = [0] * rows
        positions = [0] * rows
        # Rows that are not answering take part too; their write goes where nothing is
        # kept: past what a prompt being prefilled holds so far (its next piece replaces
        # it), past what a free row remembers.
        for row, holder in enumerate(self.rows[:rows]):
            if holder is not None and holder.answering:
                tokens[row], positions[row] = holder.token, holder.position
            elif holder is not None:
                positions[row] = holder.prefilled
            else:
                memory = self.memory[row]
                positions[row] = memory.length if memory is not None else 0
        device = self.runtime.device
        try:
            with torch.inference_mode():
                logits = self._step(
                    torch.tensor(tokens, device=device),
                    torch.tensor(positions, device=device),
                    self._kv_len(max(positions) + 1),
                )
                picked = [slot.picker.pick(logits[slot.row]) for slot in answering]  # type: ignore[union-attr]
                chosen = torch.cat(picked).tolist()
        except Exception as exc:  # the step all of them share
            for slot in answering:
                self._fail(slot, exc)
            return
        for slot, token in zip(answering, chosen, strict=True):
            slot.position += 1
            self._deliver(slot, token)
        if self.observer is not None:
            self.observer.decode_step(time.perf_counter() - t0, len(answering))

    def _bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def _kv_len(self, needed: int) -> int:
        if self.runtime.compile:
            return self.length  # one shape per bucket
        return min(self.length, -(-needed // _KV_LEN_STEP) * _KV_LEN_STEP)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One token for rows 0 .. len(tokens)-1: their float32 logits (rows, vocab). Each
        row attends to its own positions only."""
        keys = torch.arange(kv_len, device=positions.device)
        mask = (keys.unsqueeze(0) <= positions.unsqueeze(1))[:, None, None, :]
        out = self.model(
            input_ids=tokens.unsqueeze(1),
            position_ids=positions.unsqueeze(1),
            attention_mask=mask,
            cache=self.cache.decode(tokens.shape[0], positions, kv_len),
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1].float()
        return logits

    # ----------------------------------------------------------------- endings

    def _deliver(self, slot: Slot, token: int) -> None:
        """A new token of this slot's answer to its streamer; the slot ends with the answer."""
        assert slot.streamer is not None and slot.picker is not None
        try:
            slot.streamer.put_ids([token])
            if slot.picker.done(token):
                self._end(slot, None)
            else:
                slot.token = token
        except Exception as exc:  # its sink failed: this request only
            self._fail(slot, exc)

    def _fail(self, slot: Slot, exc: Exception) -> None:
        logger.exception("request=%s generation failed", slot.handle.request.id, exc_info=exc)
        oom = isinstance(exc, torch.OutOfMemoryError)
        code = "out_of_memory" if oom else "generation_failed"
        if oom and self.runtime.device.type == "cuda":
            torch.cuda.empty_cache()
        self._end(slot, EngineError(code, f"generation failed: {type(exc).__name__}: {exc}"))

    def _end(self, slot: Slot, error: EngineError | None) -> None:
        """Free the slot and hand out the final chunk (completed, cancelled or error)."""
        self.slots.remove(slot)
        if slot.row >= 0:
            self.rows[slot.row] = None
            if error is None and slot.answering:  # every position it wrote is sound
                assert slot.picker is not None and slot.prompt_embeds is not None
                ids = slot.picker.ids[: slot.position].cpu().numpy()
                self.memory[slot.row] = RowMemory(ids, slot.prompt_embeds)
        if slot.streamer is not None and error is None:
            try:
                slot.streamer.end()  # the last words (nothing once cancelled)
            except Exception as exc:
                error = EngineError("generation_failed", f"{type(exc).__name__}: {exc}")
        if not self._warming:
            self.engine._release(slot.job, slot.streamer, error, slot.started)

    # ----------------------------------------------------------------- start-up

    def warm_up(self) -> None:
        """Run the decode step once at every bucket (compile, CUDA graphs), so no request
        compiles. Call with every slot free (the rows' contents are overwritten)."""
        runs = 3 if self.runtime.device.type == "cuda" and self.runtime.compile else 1
        device = self.runtime.device
        for rows in self.buckets:
            t0 = time.perf_counter()
            for _ in range(runs):  # CUDA graphs: recorded after a warm-up run
                with torch.inference_mode():
                    self._step(
                        torch.zeros(rows, dtype=torch.long, device=device),
                        torch.zeros(rows, dtype=torch.long, device=device),
                        self._kv_len(1),
                    )
            self.engine._sync()
            logger.info(
                "warm-up decode step, batch %d%s: %.0f ms",
                rows,
                ", includes torch.compile" if self.runtime.compile else "",
                (time.perf_counter() - t0) * 1000,
            )

    def serve_now(self, job: Job) -> None:
        """Serve one warm-up request to its end right here (every slot is free)."""
        self._warming = True
        try:
            self.admit([job])
            while self.busy:
                self.step()
        finally:
            self._warming = False
