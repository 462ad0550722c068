"""`voxtral-server ttft LOGFILE [--follow] [--last N]`: percentiles from the TTFT log lines."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import numpy as np

from .api.metrics import TIMING_FIELDS, TurnRecord, parse_line

_QUANTILES = (50, 95, 99)


class Reader:
    """Log lines -> turn records, counting the lines that mention TTFT but are not records
    this server wrote (forged through client text, damaged, or from another program)."""

    def __init__(self) -> None:
        self.skipped = 0

    def records(self, lines: Iterable[str]) -> Iterator[TurnRecord]:
        for line in lines:
            record = parse_line(line)
            if record is not None:
                yield record
            elif "TTFT" in line:
                self.skipped += 1


def summary(records: Iterable[TurnRecord], skipped: int = 0) -> str:
    rows = list(records)
    lines = [f"{len(rows)} turns"]
    if skipped:
        lines[0] += f" ({skipped} lines mentioning TTFT skipped: not turn records)"
    if not rows:
        return lines[0] + " (no TTFT lines yet)"
    header = f"{'metric':<22}{'n':>6}" + "".join(f"{'p' + str(q):>10}" for q in _QUANTILES)
    lines += [header, "-" * len(header)]
    for name in TIMING_FIELDS:
        values = [v for r in rows if (v := getattr(r, name)) is not None]
        if not values:
            lines.append(f"{name:<22}{0:>6}" + "".join(f"{'-':>10}" for _ in _QUANTILES))
            continue
        cells = "".join(f"{p:>10.1f}" for p in np.percentile(values, _QUANTILES))
        lines.append(f"{name:<22}{len(values):>6}{cells}")
    statuses = Counter(r.status for r in rows)
    transports = Counter(r.transport for r in rows)
    lines.append("status: " + ", ".join(f"{k}={v}" for k, v in sorted(statuses.items())))
    lines.append("transport: " + ", ".join(f"{k}={v}" for k, v in sorted(transports.items())))
    return "\n".join(lines)


def run(path: Path, out: TextIO, follow: bool = False, last: int | None = None) -> int:
    """Print the table for the file; with `follow`, print it again whenever lines arrive."""
    if not path.is_file() and not follow:
        raise FileNotFoundError(f"{path}: no such log file")
    window: deque[TurnRecord] = deque(maxlen=last)
    reader = Reader()
    position = 0  # where reading stopped: lines appended after it are new
    pending = ""
    if path.is_file():
        with path.open(encoding="utf-8", errors="replace") as f:
            text = f.read()
            position = f.tell()
        *complete, pending = text.split("\n")
        window.extend(reader.records(complete))
    print(summary(window, reader.skipped), file=out, flush=True)
    if not follow:
        return 0
    while True:  # like `tail -f`: poll the file, survive rotation
        time.sleep(0.5)
        if not path.is_file():
            continue
        size = path.stat().st_size
        if size < position:  # rotated or truncated: start over on the new file
            position, pending = 0, ""
        if size == position:
            continue
        with path.open(encoding="utf-8", errors="replace") as f:
            f.seek(position)
            chunk = f.read()
            position = f.tell()
        pending += chunk
        *complete, pending = pending.split("\n")
        new = list(reader.records(complete))
        if new:
            window.extend(new)
            print(
                "\n" + time.strftime("%H:%M:%S ") + summary(window, reader.skipped),
                file=out,
                flush=True,
            )
