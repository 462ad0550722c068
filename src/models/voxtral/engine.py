"""The Voxtral engine: load, compile, warm up, then stream words for many requests at once.

One worker thread owns the model and every tensor: it warms up (compile and CUDA graphs are
per-thread), then serves requests from a bounded queue: confirmed ones in the order they were
submitted, speculative ones (started while the speaker pauses) only when no confirmed one waits.
With `engine.max_batch` > 1 up to that many answers run together, continuously batched
(`batching.BatchLoop`); with 1 the worker runs one `generate` at a time (the serial worker).
Callers get a `RequestHandle` (cancel) and receive `Chunk`s through a sink they pass in,
called on the worker thread: a `queue.Queue.put` for threads, `loop.call_soon_threadsafe`
for asyncio.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from transformers import CompileConfig, LogitsProcessorList, StaticCache, StoppingCriteriaList

from ...config import Settings
from ..audio import SAMPLE_RATE
from ..chat import audios as chat_audios
from ..chat import chat_messages, must_call, offered_tools
from ..chunking import ChunkSink, WordChunker, final_chunk
from ..mel import AUDIO_TOKENS_PER_WINDOW, N_SAMPLES, LogMel, processor_features
from ..requests import check_request
from ..steps import StepObserver
from ..tools import call_ids, check_required, parse_mistral
from ..types import (
    Chunk,
    EngineError,
    ModelLoadError,
    Request,
    RequestHandle,
    ToolCall,
    sampling,
)
from .batching import BatchLoop
from .batching import Job as _Job
from .embeds import AudioEmbedCache
from .load import Runtime, load_pretrained
from .prompt import PromptBuilder
from .streamer import CancelCriteria, ToolCallGate, WordStreamer

logger = logging.getLogger(__name__)

_PROMPT_TEXT_MARGIN = 64  # control and language tokens around each user turn


class ChunkStream:
    """A submitted request read from a plain thread: iterate chunks up to the final one."""

    def __init__(self) -> None:
        self._chunks: queue.Queue[Chunk] = queue.Queue()
        self.handle: RequestHandle | None = None

    def put(self, chunk: Chunk) -> None:
        self._chunks.put(chunk)

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            chunk = self._chunks.get()
            yield chunk
            if chunk.is_final:
                return

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class VoxtralEngine:
    def __init__(self, settings: Settings, processor: Any, model: Any, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.processor = processor
        self.model = model
        self.prompts = PromptBuilder(processor, settings.model.id)
        fe = processor.feature_extractor
        if getattr(fe, "dither", 0.0):
            raise ModelLoadError(
                "the processor's feature extractor dithers; the exact mel needs none"
            )
        self._mel = LogMel(np.asarray(fe.mel_filters), runtime.device)
        self._jobs: deque[_Job] = deque()  # waiting, in submission order
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._running: list[RequestHandle] = []  # taken from the queue, not yet finished
        self._thread = threading.Thread(target=self._run, name="voxtral-engine", daemon=True)
        self._gen_defaults = self._generation_defaults()
        self._static_cache: StaticCache | None = None
        self._static_cache_len = 0
        self._batch: BatchLoop | None = None
        if settings.engine.max_batch > 1:
            self._batch = BatchLoop(self)
        elif runtime.compile:
            self._static_cache_len = self._max_cache_len()
            self._static_cache = StaticCache(
                config=model.config.get_text_config(decoder=True),
                max_cache_len=self._static_cache_len,
            )
        self.warmup_ms: list[float] = []
        # Each utterance of the open conversations: their history turns plus the new one.
        turns = settings.conversation.max_turns + 1
        self._embeds = AudioEmbedCache(max(16, turns * settings.server.max_sessions))

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def load(cls, settings: Settings) -> VoxtralEngine:
        """Load, warm up (logging how long each step took), and start serving."""
        runtime = Runtime.resolve(settings)
        t0 = time.perf_counter()
        processor, model = load_pretrained(settings, runtime)
        logger.info(
            "model loaded: model=%s device=%s dtype=%s compile=%s mode=%s load_ms=%.0f",
            settings.model.id,
            runtime.device,
            str(runtime.dtype).removeprefix("torch."),
            "on" if runtime.compile else "off",
            runtime.compile_mode if runtime.compile else "-",
            (time.perf_counter() - t0) * 1000,
        )
        engine = cls(settings, processor, model, runtime)
        engine.start()
        return engine

    def start(self) -> None:
        """Start the worker; it warms up first. Returns once ready, raises if warm-up failed."""
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise ModelLoadError(f"warm-up failed: {self._startup_error}") from self._startup_error

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._startup_error is None and not self._closed

    @property
    def queue_depth(self) -> int:
        return len(self._jobs)

    def describe(self) -> dict[str, Any]:
        """For /readyz: which model runs where."""
        return {
            "engine": "transformers",
            "model": self.settings.model.id,
            "device": str(self.runtime.device),
            "compile": self.runtime.compile,
            "max_batch": self.settings.engine.max_batch,
        }

    def observe_steps(self, observer: StepObserver) -> None:
        """Report every batched prefill and decode step's duration and size to `observer`
        (from the worker thread; nothing with the serial worker)."""
        if self._batch is not None:
            self._batch.observer = observer

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what is running or queued and stop the worker (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for handle in self._running:
                handle.cancel()
            # Queued requests end as cancelled, so no caller waits forever.
            waiting = list(self._jobs)
            self._jobs.clear()
            self._work.notify_all()
        for job in waiting:
            job.handle.cancel()
            self._finish(job, None, None, None)
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine worker did not stop within %.0f s", timeout)

    # ----------------------------------------------------------------- requests

    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        """Queue a request; chunks go to `sink` on the worker thread, the last with totals.

        Confirmed requests are served in the order they were submitted, speculative ones
        (`Request.speculative`) after them, and a running speculative one is stopped when a
        confirmed request arrives. Raises `AudioInputError` for audio the model cannot
        answer and `EngineError` when the engine is closed or its queue is full; the engine
        keeps serving either way.
        """
        check_request(request, self.settings.audio.max_utterance_s)
        handle = RequestHandle(request)
        with self._lock:
            if self._closed:
                raise EngineError("engine_closed", "the engine is shutting down")
            dropped = self._drop_cancelled()
            if len(self._jobs) >= self.settings.engine.queue_size:
                busy = True
            else:
                busy = False
                self._jobs.append(_Job(handle, sink))
                self._preempt()
                self._work.notify()
        for job in dropped:  # their callers hear of it now, not when the worker gets there
            self._finish(job, None, None, None)
        if busy:
            raise EngineError(
                "engine_busy",
                f"{self.settings.engine.queue_size} requests are already waiting "
                "(engine.queue_size); try again shortly",
            )
        return handle

    def promote(self, handle: RequestHandle) -> None:
        with self._lock:
            if handle.speculative:
                handle.speculative = False
                self._preempt()

    def _drop_cancelled(self) -> list[_Job]:
        """Take cancelled requests out of the queue (under the lock): a speculative turn
        cancelled while it waited must not hold a slot that a confirmed one needs."""
        dropped = [job for job in self._jobs if job.handle.cancelled]
        if dropped:
            self._jobs = deque(job for job in self._jobs if not job.handle.cancelled)
        return dropped

    def _preempt(self) -> None:
        """(Under the lock.) A speculative request must never hold up a confirmed one: for
        each confirmed request that waits with no free slot, stop a running speculative one
        (the newest first)."""
        waiting = sum(not job.handle.speculative and not job.handle.cancelled for job in self._jobs)
        busy = sum(not handle.cancelled for handle in self._running)
        short = waiting - (self.settings.engine.max_batch - busy)
        for handle in reversed(self._running):
            if short <= 0:
                return
            if handle.speculative and not handle.cancelled:
                handle.preempted = True
                handle.cancel()
                short -= 1

    def _admit(self, free: int, wait: bool) -> list[_Job] | None:
        """Up to `free` requests to start (confirmed ones first, each kind in submission
        order); with `wait`, blocks until there is one. None once closed."""
        with self._lock:
            while wait and not self._jobs and not self._closed:
                self._work.wait()
            if self._closed:
                return None
            confirmed = [job for job in self._jobs if not job.handle.speculative]
            speculative = [job for job in self._jobs if job.handle.speculative]
            taken = (confirmed + speculative)[:free]
            if taken:  # by identity: requests hold arrays, which do not compare with ==
                ids = {id(job) for job in taken}
                self._jobs = deque(job for job in self._jobs if id(job) not in ids)
                self._running.extend(job.handle for job in taken)
            return taken

    def _release(
        self,
        job: _Job,
        streamer: WordStreamer | None,
        error: EngineError | None,
        started: float | None,
    ) -> None:
        """A taken request ended: its slot is free, its caller gets the final chunk (with
        the functions it called, whichever worker served it)."""
        with self._lock:
            self._running = [h for h in self._running if h is not job.handle]
        calls: tuple[ToolCall, ...] = ()
        if error is None and streamer is not None:
            try:
                calls = self._calls(job.handle.request, streamer)
            except EngineError as exc:  # the model's call is not one the request allows
                logger.warning("request=%s failed: %s: %s", job.handle.request.id, exc.code, exc)
                error = exc
        self._finish(job, streamer, error, started, calls)

    @staticmethod
    def _calls(request: Request, streamer: WordStreamer) -> tuple[ToolCall, ...]:
        """The functions the answer called; `EngineError` (invalid_tool_call) for a call
        that is malformed, not offered, or missing where tool_choice requires one."""
        calls: tuple[ToolCall, ...] = ()
        if streamer.call_text is not None:
            calls = parse_mistral(
                streamer.call_text, offered_tools(request), call_ids(request.history)
            )
        if request.mode == "chat" and not streamer.cut_short:
            check_required(request, calls, streamer.text)
        return calls

    def _next_job(self) -> _Job | None:
        """The next request to serve (blocking), or None once closed."""
        jobs = self._admit(1, wait=True)
        return jobs[0] if jobs else None

    def stream(self, request: Request) -> ChunkStream:
        """Submit and read the chunks from this thread: `for chunk in engine.stream(r)`."""
        stream = ChunkStream()
        stream.handle = self.submit(request, stream.put)
        return stream

    # ----------------------------------------------------------------- worker

    def _run(self) -> None:
        try:
            self._warmup()
        except BaseException as exc:  # reported to start(), which raises it
            logger.exception("warm-up failed")
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        if self._batch is not None:
            self._batch.run()
            return
        while True:
            job = self._next_job()
            if job is None:
                return
            self._serve(job)
            # Let go of the request now, while idle: the sink may hold the last reference to
            # a closed conversation, and freeing that (its VAD model, its audio) must not
            # happen on the next request's clock, inside its queue wait.
            del job

    def _warmup(self) -> None:
        runs = self.settings.model.warmup_runs
        if runs == 0:
            return
        if self._batch is not None:
            self._batch.warm_up()  # every decode bucket first: the requests below use one
        silence = np.zeros(int(self.settings.model.warmup_audio_s * SAMPLE_RATE), np.float32)
        for i in range(runs):
            for mode in ("transcribe", "chat"):
                t0 = time.perf_counter()
                handle = RequestHandle(Request(silence, mode, max_new_tokens=8, min_new_tokens=8))
                if self._batch is not None:
                    self._batch.serve_now(_Job(handle, lambda chunk: None))
                else:
                    self._generate(handle, self._streamer(handle, lambda chunk: None))
                self._sync()
                elapsed = (time.perf_counter() - t0) * 1000
                self.warmup_ms.append(elapsed)
                # (batched: the decode step was compiled above, bucket by bucket)
                first = len(self.warmup_ms) == 1
                compiling = self.runtime.compile and self._batch is None and first
                logger.info(
                    "warm-up run %d/%d (%s%s): %.0f ms",
                    i + 1,
                    runs,
                    mode,
                    ", includes torch.compile" if compiling else "",
                    elapsed,
                )

    def _sync(self) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)

    def _serve(self, job: _Job) -> None:
        handle = job.handle
        started = time.perf_counter()
        if handle.cancelled:  # cancelled while it waited in the queue
            self._release(job, None, None, None)
            return
        streamer = self._streamer(handle, job.sink)
        error: EngineError | None = None
        try:
            self._generate(handle, streamer)
        except EngineError as exc:  # the request's own fault (its conversation)
            logger.warning("request=%s failed: %s: %s", handle.request.id, exc.code, exc)
            error = exc
        except Exception as exc:  # one request's failure must not stop the worker
            logger.exception("request=%s generation failed", handle.request.id)
            oom = isinstance(exc, torch.OutOfMemoryError)
            code = "out_of_memory" if oom else "generation_failed"
            error = EngineError(code, f"generation failed: {type(exc).__name__}: {exc}")
            if oom and self.runtime.device.type == "cuda":
                torch.cuda.empty_cache()
        self._release(job, streamer, error, started)

    def _finish(
        self,
        job: _Job,
        streamer: WordStreamer | None,
        error: EngineError | None,
        started: float | None,
        calls: tuple[ToolCall, ...] = (),
    ) -> None:
        """Hand out the final chunk. `streamer`/`started` are None if it never ran."""
        handle = job.handle
        final = final_chunk(handle, streamer, error, started, time.perf_counter(), calls)
        queue_wait_ms = final.totals.queue_wait_ms if final.totals else 0.0
        try:
            job.sink(final)
        except Exception:  # the caller went away; nothing else to tell it
            logger.exception("request=%s could not hand out the final chunk", handle.request.id)
        target = self.settings.streaming.latency_target_ms
        first_ms = final.first_token_latency_ms or 0.0
        if streamer is not None and streamer.chunks and first_ms > target:
            logger.warning(
                "request=%s first token after %.1f ms, above streaming.latency_target_ms=%g "
                "(queue_wait_ms=%.1f)",
                handle.request.id,
                final.first_token_latency_ms,
                target,
                queue_wait_ms,
            )

    # ----------------------------------------------------------------- model calls

    def _max_cache_len(self) -> int:
        """Tokens of the longest prompt + answer the settings allow."""
        s = self.settings
        windows = -(-int(s.audio.max_utterance_s * SAMPLE_RATE) // N_SAMPLES)
        per_user = AUDIO_TOKENS_PER_WINDOW * windows + _PROMPT_TEXT_MARGIN
        if s.conversation.instructions:
            per_user += len(self.processor.tokenizer.encode(s.conversation.instructions))
        turns = s.conversation.max_turns + 1
        return turns * (per_user + s.model.max_new_tokens)

    def _generation_defaults(self) -> dict[str, Any]:
        if not self.runtime.compile:
            return {}
        config = CompileConfig(mode=self.runtime.compile_mode)
        if self.runtime.device.type != "cuda":
            config._compile_all_devices = True  # transformers compiles on CUDA only by default
        return {"compile_config": config}

    def _cache_kwargs(self, request: Request, prompt_len: int, max_new: int) -> dict[str, Any]:
        """With compile: our one static KV cache, emptied, if this request fits in it.

        One cache for the engine's life keeps the compiled decode step's shapes and (under
        CUDA graphs) its tensor addresses fixed, so no request recompiles or re-records;
        transformers would otherwise build a new cache per `generate` call.
        """
        if self._static_cache is None:
            return {}
        if prompt_len + max_new > self._static_cache_len:
            logger.warning(
                "request=%s prompt of %d tokens + %d new exceeds the static cache (%d): "
                "running uncompiled",
                request.id,
                prompt_len,
                max_new,
                self._static_cache_len,
            )
            return {"disable_compile": True}
        self._static_cache.reset()
        return {"past_key_values": self._static_cache, **self._gen_defaults}

    def _features(self, audio: np.ndarray) -> torch.Tensor:
        if self.settings.model.mel == "reduced":
            return self._mel(audio)
        return processor_features(self.processor.feature_extractor, audio)

    def model_inputs(self, request: Request) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and inputs_embeds (audio in place) for one request.

        Each utterance goes through the audio encoder once: the embeddings of a chat's
        earlier turns come from `_audio_embeds`'s cache, so a long conversation's TTFT does
        not grow with the audio it would otherwise re-read.
        """
        if request.mode == "transcribe":
            assert request.audio is not None  # check_request
            ids = self.prompts.transcription(request.audio, request.language)
            audios = [request.audio]
        else:
            messages = chat_messages(request)
            ids = self.prompts.chat(messages, offered_tools(request))
            audios = chat_audios(messages)
        input_ids = torch.tensor([ids], device=self.runtime.device)
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = (input_ids == self.model.config.audio_token_id).unsqueeze(-1).expand_as(embeds)
        if not audios:  # a text-only conversation
            return {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "inputs_embeds": embeds,
            }
        audio = torch.cat([self._audio_embeds(a) for a in audios])
        if int(mask.sum()) != audio.numel():
            raise EngineError(
                "generation_failed",
                f"prompt has {int(mask.sum()) // embeds.shape[-1]} audio tokens but the audio "
                f"encoder gave {audio.shape[0]} embeddings",
            )
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "inputs_embeds": embeds.masked_scatter(mask, audio.to(embeds.dtype)),
        }

    def _audio_embeds(self, audio: np.ndarray) -> torch.Tensor:
        """The audio encoder's output for one utterance (remembered: it is the next turn's
        history)."""
        embeds = self._embeds.get(audio)
        if embeds is None:
            features = self._features(audio).to(self.runtime.device, self.runtime.dtype)
            embeds = self.model.get_audio_features(features).pooler_output
            self._embeds.put(audio, embeds)
        return embeds

    def _sampling(self, request: Request) -> dict[str, Any]:
        temperature, top_p = sampling(request, self.settings.chat)
        if top_p is None:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}

    def _streamer(self, handle: RequestHandle, sink: ChunkSink) -> WordStreamer:
        cr = self.settings.chunked_response
        request = handle.request
        calls = request.mode == "chat" and bool(offered_tools(request))
        return WordStreamer(
            self.processor.tokenizer,
            handle,
            WordChunker(cr.min_words_per_chunk, cr.max_words_per_chunk),
            cr.chunk_timeout_ms / 1000.0,
            sink,
            tool_calls_token=self.prompts.tool_calls_token if calls else None,
        )

    def _tool_gate(self, request: Request, prompt_len: int) -> list[ToolCallGate]:
        """A chat answer calls no function unless one is offered, and must start with a call
        when tool_choice requires one."""
        if request.mode != "chat":
            return []
        token = self.prompts.tool_calls_token
        if not offered_tools(request):
            return [ToolCallGate(token, "forbid", prompt_len)]
        if must_call(request):
            return [ToolCallGate(token, "force", prompt_len)]
        return []

    def _generate(self, handle: RequestHandle, streamer: WordStreamer) -> None:
        request = handle.request
        max_new_tokens = request.max_new_tokens or self.settings.model.max_new_tokens
        if request.seed is not None:  # one worker thread: the global generator is its own
            torch.manual_seed(request.seed)
        with torch.inference_mode():
            inputs = self.model_inputs(request)
            prompt_len = inputs["input_ids"].shape[1]
            self.model.generate(
                **inputs,
                **self._cache_kwargs(request, prompt_len, max_new_tokens),
                **self._sampling(request),
                max_new_tokens=max_new_tokens,
                min_new_tokens=request.min_new_tokens,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([CancelCriteria(handle)]),
                logits_processor=LogitsProcessorList(self._tool_gate(request, prompt_len)),
            )
