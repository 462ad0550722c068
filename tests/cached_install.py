"""Install something big once and reuse it: a directory, a stamp file, a file lock, a log.

The vLLM venv and the stock-client environments (venvs, a node_modules folder) are built
the same way: under an exclusive lock (two pytest processes may ask at once), reused when
the stamp inside the directory holds the same recipe, otherwise wiped and rebuilt, with
every command's output in `<dir>-install.log` next to it. A half-finished build has no
stamp, so it is never reused.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

STAMP_NAME = ".voxtral-installed"


class InstallFailed(RuntimeError):
    """A build command failed or timed out; the message names it and quotes the log."""

    def __init__(self, message: str, log_text: str = "") -> None:
        super().__init__(message)
        self.log_text = log_text


def run_logged(cmd: list[str], log: Path, timeout_s: float, cwd: Path | None = None) -> None:
    """Run `cmd`, appending its output to `log`; `InstallFailed` (with the log's tail) if it
    fails or outlives `timeout_s` (a bound on a hung download, not a performance check)."""
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            result = subprocess.run(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
                cwd=cwd,
            )
        except subprocess.TimeoutExpired:
            text = log.read_text(encoding="utf-8", errors="replace")
            what = f"`{' '.join(cmd[:4])} ...` timed out after {timeout_s:.0f} s"
            raise InstallFailed(what, text) from None
    if result.returncode != 0:
        text = log.read_text(encoding="utf-8", errors="replace")
        tail = "\n".join(text.splitlines()[-15:])
        raise InstallFailed(
            f"`{' '.join(cmd[:4])} ...` failed (exit {result.returncode}); log {log}:\n{tail}",
            text,
        )


def cached_install(
    target: Path, recipe: str, build: Callable[[Path], None], stamp_name: str = STAMP_NAME
) -> bool:
    """Make sure `target` was built from `recipe` (any text naming what is in it).

    If the stamp in `target` holds `recipe`, nothing happens (returns False). Otherwise
    `target` is removed and `build(log)` makes it again (returns True); `build` raises
    `InstallFailed` to give up, and the stamp is only written after it returns.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    stamp = target / stamp_name
    lock_path = target.parent / (target.name + ".lock")
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest process may be installing
        if stamp.is_file() and stamp.read_text(encoding="utf-8") == recipe:
            return False
        log = target.parent / (target.name + "-install.log")
        log.write_text("", encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        t0 = time.perf_counter()
        logger.info("building %s (once; log %s)", target, log)
        build(log)
        stamp.write_text(recipe, encoding="utf-8")
        logger.info("built %s in %.0f s", target, time.perf_counter() - t0)
        return True
