"""The vLLM engine: turns streamed from one or more vLLM servers' OpenAI-compatible API.

Same contract as `VoxtralEngine` (`submit(request, sink) -> RequestHandle`, word chunks then
one final chunk with `Totals`), so sessions, transports, logs and metrics do not change.
Chat turns go to `/v1/chat/completions` (the bounded history as earlier user audio +
assistant answers, the instructions as a text part after the audio, as the local engine's
prompt has them); transcribe turns to `/v1/audio/transcriptions` with `stream=true`.

Threads: the engine owns one asyncio loop in a daemon thread; the pooled
`httpx.AsyncClient`, every turn's task and the endpoint probes live on it. `submit()` (any
thread, normally the server's event loop) picks the endpoint and hands the turn to that loop
with `call_soon_threadsafe`; sinks are called on the engine thread.

Endpoints: each turn goes to the up endpoint with the fewest turns in flight (ties: the one
that has been sent fewer turns). An endpoint whose connection fails, answers 5xx, or sends
no delta for `delta_timeout_s` is marked down; the turn caught on it ends with an error
naming it, and a probe polls its `/health` with exponential backoff (`probe_interval_s`
doubling up to `probe_max_interval_s`) until it answers, then it takes turns again. With no
endpoint up, `ready` is False and `submit()` refuses turns with `no_endpoint`.

Cancel: `handle.cancel()` cancels the turn's task; leaving the `async with` of the stream
closes the HTTP response, which makes vLLM abort the request. The cancel latency is cancel()
-> stream closed, measured like the local engine's cancel() -> generation stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from ...config import Settings
from ..chat import must_call, offered_tools
from ..chunking import ChunkSink, DeltaChunker, WordChunker, final_chunk
from ..requests import check_request
from ..tools import ToolCallParts, call_ids, check_required
from ..types import EngineError, Request, RequestHandle, ToolCall
from .endpoints import Endpoint, probe_delays
from .wire import (
    ERROR_BODY_CHARS,
    TurnFailed,
    build_request,
    describe_http_error,
    feed,
    parse_event,
    status_error,
)

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")


@dataclass
class _VllmHandle(RequestHandle):
    """A `RequestHandle` whose cancel() also tells the engine loop to close the stream."""

    on_cancel: Callable[[], None] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        first = not self.cancelled
        super().cancel()
        if first and self.on_cancel is not None:
            self.on_cancel()


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Turn:
    handle: _VllmHandle
    sink: ChunkSink
    endpoint: Endpoint
    task: asyncio.Task[None] | None = None
    running: bool = False  # its task has started (a task cancelled before that never runs)


class VllmEngine:
    def __init__(
        self,
        settings: Settings,
        sleep: Sleep = asyncio.sleep,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Start the engine thread and its HTTP client; `load()` also checks the endpoints.

        `sleep` is what the probes wait with (tests record the backoff with it);
        `on_change(describe())` is called on the engine thread whenever an endpoint goes
        down or comes back up.
        """
        self.settings = settings
        self.vllm = settings.engine.vllm
        self._sleep = sleep
        self._on_change = on_change
        self._lock = threading.Lock()  # endpoints' up/in_flight, _closed
        self._closed = False
        self._endpoints = [Endpoint(url.rstrip("/")) for url in self.vllm.endpoints]
        self._turns: set[_Turn] = set()  # started on the engine loop, not yet finished
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="vllm-engine", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient = self._call(self._make_client())

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def load(
        cls,
        settings: Settings,
        sleep: Sleep = asyncio.sleep,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> VllmEngine:
        """Start, ask every endpoint for /health (and its model), log what was found.

        Endpoints that do not answer are marked down and probed; none up is not an error
        here (vLLM may still be starting): `/readyz` says so until one comes up.
        """
        t0 = time.perf_counter()
        engine = cls(settings, sleep, on_change)
        engine._call(engine._check_all())
        d = engine.describe()
        up = [e["url"] for e in d["endpoints"] if e["up"]]
        logger.info(
            "model loaded: engine=vllm endpoints=%s up=%d/%d model=%s load_ms=%.0f",
            ",".join(e["url"] for e in d["endpoints"]),
            len(up),
            len(d["endpoints"]),
            d["model"] or "-",
            (time.perf_counter() - t0) * 1000,
        )
        if not up:
            logger.warning("no vLLM endpoint is up yet: turns are refused until one is")
        return engine

    @property
    def ready(self) -> bool:
        with self._lock:
            return not self._closed and any(e.up for e in self._endpoints)

    @property
    def queue_depth(self) -> int:
        """Turns in flight on all endpoints."""
        with self._lock:
            return sum(e.in_flight for e in self._endpoints)

    def describe(self) -> dict[str, Any]:
        """For /readyz: which endpoints are up and how busy they are."""
        with self._lock:
            models = [e.model for e in self._endpoints if e.model]
            return {
                "engine": "vllm",
                "model": self.vllm.model or (models[0] if models else None),
                "endpoints": [e.describe() for e in self._endpoints],
            }

    def close(self, timeout: float = 30.0) -> None:
        """Cancel turns in flight (they end as cancelled), stop probes, close the HTTP
        client, stop the engine thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._call(self._shutdown(), timeout)
        except (FutureTimeout, RuntimeError) as exc:
            logger.warning("vLLM engine did not shut down cleanly: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("vLLM engine thread did not stop within %.0f s", timeout)
        else:
            self._loop.close()

    # ----------------------------------------------------------------- requests

    def submit(self, request: Request, sink: ChunkSink) -> RequestHandle:
        """Send a turn to the least busy endpoint; chunks go to `sink` on the engine thread.

        Raises `AudioInputError` for audio the model cannot answer and `EngineError` when
        the engine is closed (`engine_closed`) or no endpoint is up (`no_endpoint`).
        """
        check_request(request, self.settings.audio.max_utterance_s)
        handle = _VllmHandle(request)
        with self._lock:
            if self._closed:
                raise EngineError("engine_closed", "the engine is shutting down")
            up = [e for e in self._endpoints if e.up]
            if not up:
                raise EngineError("no_endpoint", self._none_up_message())
            endpoint = min(up, key=lambda e: (e.in_flight, e.turns))
            endpoint.in_flight += 1
            endpoint.turns += 1
            turn = _Turn(handle, sink, endpoint)
            handle.on_cancel = lambda: self._wake(turn)
            # Under the lock: close() cannot run between the check above and this, so its
            # shutdown (queued after) sees this turn's task.
            self._loop.call_soon_threadsafe(self._start_turn, turn)
        logger.debug(
            "request=%s sent to %s (in flight there: %d)",
            request.id,
            endpoint.url,
            endpoint.in_flight,
        )
        return handle

    def promote(self, handle: RequestHandle) -> None:
        """vLLM batches every request it is sent, so a speculative one holds nobody up:
        there is no order to change."""
        handle.speculative = False

    def _none_up_message(self) -> str:
        reasons = "; ".join(f"{e.url}: {e.error or 'down'}" for e in self._endpoints)
        return (
            f"no vLLM endpoint is up ({reasons}); they are probed at /health and take "
            "turns again as soon as they answer"
        )

    # ----------------------------------------------------------------- engine loop

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the engine loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _make_client(self) -> httpx.AsyncClient:
        v = self.vllm
        headers = {"Authorization": f"Bearer {v.api_key}"} if v.api_key else {}
        # Reads are bounded per delta by asyncio.timeout (delta_timeout_s) in _stream; httpx
        # bounds connecting and sending the audio.
        timeout = httpx.Timeout(
            connect=v.connect_timeout_s, read=None, write=v.delta_timeout_s, pool=None
        )
        # No cap on connections: a turn must never wait for a pooled connection (that wait
        # would count against delta_timeout_s and blame the endpoint); max_sessions bounds it.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        return httpx.AsyncClient(timeout=timeout, headers=headers, limits=limits)

    async def _shutdown(self) -> None:
        turns = list(self._turns)
        for turn in turns:
            turn.handle.cancel()  # they finish as cancelled and hand out their final chunk
        await asyncio.gather(*(t.task for t in turns if t.task), return_exceptions=True)
        probes = [e.probe for e in self._endpoints if e.probe is not None]
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        await self._client.aclose()

    # ----------------------------------------------------------------- endpoints

    async def _check_all(self) -> None:
        await asyncio.gather(*(self._check(e) for e in self._endpoints))

    async def _check(self, endpoint: Endpoint) -> None:
        """Probe once: up (with its model) or down with a probe task."""
        error = await self._health(endpoint)
        if error is None:
            self._set_up(endpoint)
        else:
            self._mark_down(endpoint, error)

    async def _health(self, endpoint: Endpoint) -> str | None:
        """None if /health answers 200 and the model name is known, else why not."""
        timeout = self.vllm.connect_timeout_s
        try:
            r = await self._client.get(f"{endpoint.url}/health", timeout=timeout)
            if r.status_code != 200:
                return f"/health answered {r.status_code}"
            if self.vllm.model is None and endpoint.model is None:
                r = await self._client.get(f"{endpoint.url}/v1/models", timeout=timeout)
                if r.status_code != 200:
                    return f"/v1/models answered {r.status_code}: {r.text[:ERROR_BODY_CHARS]}"
                models = r.json().get("data") or []
                if not models:
                    return "/v1/models lists no model"
                endpoint.model = str(models[0]["id"])
        except httpx.HTTPError as exc:
            return describe_http_error(exc)
        except (ValueError, KeyError, TypeError) as exc:
            return f"/v1/models answered something else than a model list ({exc})"
        return None

    def _set_up(self, endpoint: Endpoint) -> None:
        with self._lock:
            was_down = not endpoint.up
            endpoint.up = True
            endpoint.error = None
        if was_down:
            logger.info("vLLM endpoint %s is up again", endpoint.url)
            self._changed()

    def _mark_down(self, endpoint: Endpoint, reason: str) -> None:
        """Engine loop only: stop routing turns to it and probe it until it answers."""
        with self._lock:
            endpoint.up = False
            endpoint.error = reason
            closed = self._closed
        logger.warning("vLLM endpoint %s is down (%s): probing /health", endpoint.url, reason)
        self._changed()
        if not closed and (endpoint.probe is None or endpoint.probe.done()):
            endpoint.probe = self._loop.create_task(self._probe(endpoint), name="vllm-probe")

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change(self.describe())
            except Exception:  # an observer's bug must not stop the probes
                logger.exception("on_change callback failed")

    async def _probe(self, endpoint: Endpoint) -> None:
        for delay in probe_delays(self.vllm.probe_interval_s, self.vllm.probe_max_interval_s):
            await self._sleep(delay)
            error = await self._health(endpoint)
            if error is None:
                self._set_up(endpoint)
                return
            with self._lock:
                endpoint.error = error
            logger.debug("vLLM endpoint %s still down: %s", endpoint.url, error)

    # ----------------------------------------------------------------- turns

    def _start_turn(self, turn: _Turn) -> None:
        turn.task = self._loop.create_task(self._run_turn(turn), name="vllm-turn")
        self._turns.add(turn)
        turn.task.add_done_callback(lambda _: self._turns.discard(turn))

    def _wake(self, turn: _Turn) -> None:
        """From cancel() on any thread: close the turn's stream on the engine loop."""
        # A closed engine has finished every turn: there is nothing left to close.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._cancel_turn, turn)

    def _cancel_turn(self, turn: _Turn) -> None:
        # Not yet started: _run_turn sees handle.cancelled first thing and never streams.
        if turn.running and turn.task is not None:
            turn.task.cancel()

    async def _run_turn(self, turn: _Turn) -> None:
        turn.running = True
        handle, endpoint = turn.handle, turn.endpoint
        started = time.perf_counter()
        stream: DeltaChunker | None = None
        error: EngineError | None = None
        parts = ToolCallParts()
        calls: tuple[ToolCall, ...] = ()
        try:
            if not handle.cancelled:
                stream = self._chunker(handle, turn.sink)
                await self._stream(turn, stream, parts)
                stream.end_text()
                request = handle.request
                if request.mode == "chat" and not stream.cut_short:
                    if parts or (parts.cut_off and must_call(request)):
                        calls = parts.finish(offered_tools(request), call_ids(request.history))
                    check_required(request, calls, stream.text)
        except asyncio.CancelledError:
            if stream is not None:
                stream.end_text()  # cancelled: records that the answer was cut short
        except TurnFailed as exc:
            error = EngineError(exc.code, str(exc))
            if exc.endpoint_down:
                self._mark_down(endpoint, str(exc))
        except EngineError as exc:  # e.g. the model's function call is not valid
            error = exc
        except Exception as exc:  # e.g. the sink raised; one turn must not stop the engine
            logger.exception("request=%s vLLM turn failed", handle.request.id)
            error = EngineError("generation_failed", f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                endpoint.in_flight -= 1
        final = final_chunk(
            handle,
            stream,
            error,
            started if stream is not None else None,
            time.perf_counter(),
            calls,
        )
        try:
            turn.sink(final)
        except Exception:  # the caller went away; nothing else to tell it
            logger.exception("request=%s could not hand out the final chunk", handle.request.id)
        if error is not None:
            logger.warning(
                "request=%s vLLM turn ended with %s: %s", handle.request.id, error.code, error
            )

    def _chunker(self, handle: RequestHandle, sink: ChunkSink) -> DeltaChunker:
        cr = self.settings.chunked_response
        return DeltaChunker(
            handle,
            WordChunker(cr.min_words_per_chunk, cr.max_words_per_chunk),
            cr.chunk_timeout_ms / 1000.0,
            sink,
        )

    def _http_request(self, request: Request, endpoint: Endpoint) -> httpx.Request:
        model = self.vllm.model or endpoint.model or ""
        return build_request(self._client, request, endpoint.url, model, self.settings)

    async def _stream(self, turn: _Turn, stream: DeltaChunker, calls: ToolCallParts) -> None:
        """Read the turn's server-sent events into `stream` (function calls into `calls`)
        until `[DONE]`."""
        endpoint = turn.endpoint
        where = f"vLLM endpoint {endpoint.url}"
        wait_s = self.vllm.delta_timeout_s
        no_delta = TurnFailed(
            "delta_timeout",
            f"{where} sent nothing for {wait_s:g} s (engine.vllm.delta_timeout_s)",
            endpoint_down=True,
        )
        try:
            async with asyncio.timeout(wait_s):
                response = await self._client.send(
                    self._http_request(turn.handle.request, endpoint), stream=True
                )
        except TimeoutError:
            raise no_delta from None
        except httpx.HTTPError as exc:
            raise TurnFailed(
                "endpoint_failed", f"{where} failed: {describe_http_error(exc)}", True
            ) from None
        try:
            if response.status_code != 200:
                raise await status_error(response, where)
            lines = response.aiter_lines()
            while True:
                try:
                    async with asyncio.timeout(wait_s):
                        line = await anext(lines)
                except StopAsyncIteration:
                    raise TurnFailed(
                        "endpoint_failed", f"{where} ended the stream before [DONE]", True
                    ) from None
                except TimeoutError:
                    raise no_delta from None
                except httpx.HTTPError as exc:
                    raise TurnFailed(
                        "endpoint_failed",
                        f"{where} failed mid-answer: {describe_http_error(exc)}",
                        True,
                    ) from None
                if not line.startswith("data:"):
                    continue  # blank separators, comments
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                feed(stream, parse_event(data, where), time.perf_counter(), calls)
        finally:
            await response.aclose()  # on cancel too: closing the stream makes vLLM abort
