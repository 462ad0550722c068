"""How long to wait for things outside this process on a machine that may be busy.

A wait here only bounds how long a test waits for an event (a process start, a page state);
it never decides whether a behaviour passed. On a loaded machine everything is slower by
about the run queue per core, so the bases below are stretched by that factor, up to a cap.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO


def load_factor() -> float:
    """Runnable processes per core over the last minute, at least 1."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return 1.0
    return max(1.0, load / (os.cpu_count() or 1))


def scaled(base_s: float, cap_s: float) -> float:
    """`base_s` stretched by the current load factor, never more than `cap_s`."""
    return min(base_s * load_factor(), cap_s)


class LineWatcher:
    """Reads a child's text stream on a thread, keeps its tail, and waits for a line.

    Unlike `for line in proc.stdout`, the wait ends when the process dies or when the
    (load-scaled) time is up, and the failure message carries the stream's last lines.
    """

    def __init__(self, stream: IO[str], name: str, keep: int = 30) -> None:
        self.name = name
        self.tail: deque[str] = deque(maxlen=keep)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)  # end of stream: the process closed it (exited)

    def wait_for(self, match: Callable[[str], bool], base_s: float, cap_s: float) -> str:
        """The first line for which `match` is true; raises `NotReady` if the stream ends
        first or no such line comes within `scaled(base_s, cap_s)` seconds."""
        budget = scaled(base_s, cap_s)
        deadline = time.monotonic() + budget
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise NotReady(
                    f"{self.name} did not get ready within {budget:.0f} s "
                    f"(base {base_s:.0f} s x load factor {load_factor():.1f}, cap {cap_s:.0f} s)",
                    self.tail_text(),
                ) from None
            if line is None:
                raise NotReady(f"{self.name} exited before it was ready", self.tail_text())
            self.tail.append(line.rstrip("\n"))
            if match(line):
                return line

    def tail_text(self) -> str:
        return "\n".join(self.tail) or "(no output)"

    def rest(self, timeout: float) -> str:
        """Everything the stream still says until it closes (or `timeout` passes)."""
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            out.append(line)
        return "".join(out)


class NotReady(RuntimeError):
    """An external process did not get ready; the message names it and the wait."""

    def __init__(self, what: str, tail: str) -> None:
        super().__init__(f"{what}; its last output:\n{tail}")
