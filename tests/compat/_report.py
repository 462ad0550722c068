"""What the Python client programs share: JSON lines out, the test audio in, a deadline.

Imported by the programs in this folder only (they run in the clients' own venvs, with
nothing of this project installed), so it needs nothing but the standard library.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

SAMPLE_RATE = 24_000
CHUNK_BYTES = SAMPLE_RATE // 10 * 2  # 100 ms of PCM16 mono, as these clients send it
HANG_GRACE_S = 20.0  # after the deadline, for the client's own clean-up


def emit(kind: str, **fields: Any) -> None:
    """One observation for the test, as a JSON line."""
    sys.stdout.write(json.dumps({"kind": kind, **fields}, default=str) + "\n")
    sys.stdout.flush()


class _Forward(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {record.exc_info[1]!r}"
        emit("log", level=record.levelname, logger=record.name, message=text[:4000])


def forward_logging(level: int = logging.WARNING) -> None:
    """Every warning or error the client library logs (through `logging`) becomes a `log`
    line: these libraries report a dropped or invalid event there, not to the caller."""
    logging.getLogger().addHandler(_Forward(level=level))


def read_pcm(path: str) -> bytes:
    """The test's speech: raw PCM16 mono at 24 kHz, already followed by trailing silence."""
    return Path(path).read_bytes()


def chunks(pcm: bytes, size: int = CHUNK_BYTES) -> list[bytes]:
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


async def microphone(
    send: Callable[[bytes], Awaitable[None] | None],
    pcm: bytes,
    until: asyncio.Event,
    max_silence_s: float = 60.0,
) -> None:
    """A live microphone: `pcm`, then silence, one 100 ms chunk every 100 ms, until `until`
    is set (the answer came) or `max_silence_s` of silence went out. Turn detection on the
    server ends the turn on audio time, so it needs the silence that a real mic keeps
    sending after the speaker stops; the pacing only imitates that mic."""
    silence = bytes(CHUNK_BYTES)
    sent_silence = 0.0
    for chunk in chunks(pcm):
        if until.is_set():
            return
        result = send(chunk)
        if result is not None:
            await result
        await asyncio.sleep(0.1)
    while not until.is_set() and sent_silence < max_silence_s:
        result = send(silence)
        if result is not None:
            await result
        sent_silence += 0.1
        await asyncio.sleep(0.1)


def run(main: Callable[[list[str]], Awaitable[None]], deadline_s: float) -> None:
    """Run `main(argv)`; an exception or the deadline becomes a `crash` line (the test
    fails on it, with the traceback), never a hang. `end` is always the last line."""

    def hung() -> None:  # the client did not even unwind after the deadline
        emit("crash", error=f"still running {HANG_GRACE_S:g} s after the deadline")
        emit("end")
        os._exit(3)

    watchdog = threading.Timer(deadline_s + HANG_GRACE_S, hung)
    watchdog.daemon = True
    watchdog.start()

    async def bounded() -> None:
        await asyncio.wait_for(main(sys.argv[1:]), deadline_s)

    try:
        asyncio.run(bounded())
    except BaseException as exc:  # report everything, including the deadline
        emit("crash", error=repr(exc), traceback=traceback.format_exc())
    finally:
        emit("end")
