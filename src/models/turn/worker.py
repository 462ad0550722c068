"""End-of-turn verdicts off the event loop: one thread runs the judge for every session.

A session asks "has the speaker finished?" while a pause grows; the judge (Smart Turn, ~100 ms
of CPU per call on a small machine) must neither hold the event loop nor pile up work: each
session has at most one question waiting, and a newer question from the same session
replaces the one not yet started (the answer to the older one would be stale anyway).
Answers go to the asker's callback, on this thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

import numpy as np

from . import judge as judge_module

logger = logging.getLogger(__name__)


class Judge(Protocol):
    name: str

    def completeness(self, audio: np.ndarray) -> float:
        """P(the speaker has finished) from 16 kHz mono float32 audio of the turn so far."""
        ...


OnVerdict = Callable[[float | None, float], None]  # (probability or None if failed, ms taken)


class JudgeWorker:
    """Thread-safe; `close()` stops the thread (questions still waiting get no answer)."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiting: OrderedDict[Hashable, tuple[np.ndarray, OnVerdict]] = OrderedDict()
        self._closed = False
        self.calls = 0
        self._thread = threading.Thread(target=self._run, name="turn-judge", daemon=True)
        self._thread.start()

    def ask(self, key: Hashable, audio: np.ndarray, on_verdict: OnVerdict) -> None:
        """Judge `audio` for `key` (a session): replaces `key`'s question not yet started."""
        with self._lock:
            if self._closed:
                return
            self._waiting.pop(key, None)
            self._waiting[key] = (audio, on_verdict)
            self._work.notify()

    def forget(self, key: Hashable) -> None:
        """Drop `key`'s question if it has not started (a verdict in progress still comes)."""
        with self._lock:
            self._waiting.pop(key, None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            self._waiting.clear()
            self._work.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                _, (audio, on_verdict) = self._waiting.popitem(last=False)
            started = time.perf_counter()
            verdict: float | None
            try:
                verdict = float(self.judge.completeness(audio))
            except Exception:  # a failing judge must not take the worker down
                logger.exception("turn judge %s failed", self.judge.name)
                verdict = None
            self.calls += 1
            try:
                on_verdict(verdict, (time.perf_counter() - started) * 1000)
            except Exception:
                logger.exception("turn judge callback failed")


def load_judge(kind: str, required: bool) -> tuple[JudgeWorker | None, str | None]:
    """The judge `vad.judge` names, warmed up, on its thread: (worker, None), or (None, why
    it could not load). Raises instead when `required` (semantic_vad is the configured
    default and no fallback was allowed). Blocking: call off the event loop."""
    try:
        judge = judge_module.load_turn_judge(kind)
    except judge_module.TurnJudgeUnavailable as exc:
        if required:
            raise
        return None, str(exc)
    return JudgeWorker(judge), None
