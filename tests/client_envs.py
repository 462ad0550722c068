"""The stock OpenAI Realtime clients, each in a cached environment of its own, for the
compatibility tests (tests/test_compat_*.py).

These clients pin versions that do not sit well in the project's venv (openai-agents wants
websockets < 17; LiveKit brings ~420 MB of its own), so each gets a venv (or, for the npm
packages, a node_modules folder) under `$XDG_CACHE_HOME/voxtral-server/clients/`, or where
its environment variable says (CI points them at its cache). They are built once, behind
a file lock and a stamp (tests/cached_install.py), and reused while the recipe is the same.
`python tests/client_envs.py` builds them all ahead of time and prints how long each took.

pipecat-ai is already a dependency of the project (its Smart Turn model), so its client
runs in the project's own interpreter when that one has the pinned version; only
otherwise does it get a venv.

A build that fails because PyPI or npm cannot be reached makes the tests skip, saying so;
any other failure is a test failure (with the install log's tail).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cached_install import InstallFailed, cached_install, run_logged

logger = logging.getLogger(__name__)

INSTALL_TIMEOUT_S = 1800.0  # a bound on a hung download, never a performance check
# What pip and npm print when the index cannot be reached (as opposed to a real failure).
OFFLINE_SIGNS = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|Could not fetch URL|"
    r"No matching distribution found|ConnectionError|ReadTimeoutError|"
    r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|network request"
)
# Heavy wheels these clients must not pull in (a CPU machine gets multi-GB CUDA builds).
FORBIDDEN = ("torch", "nvidia-cublas-cu12", "triton")


class ClientUnavailable(RuntimeError):
    """The client's environment cannot be built; `offline` says whether for lack of a
    network to PyPI/npm (skip) or for another reason (fail)."""

    def __init__(self, message: str, offline: bool) -> None:
        super().__init__(message)
        self.offline = offline


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "voxtral-server" / "clients"


def _unavailable(name: str, exc: InstallFailed) -> ClientUnavailable:
    offline = bool(OFFLINE_SIGNS.search(exc.log_text))
    why = "no network to the package index" if offline else "the install failed"
    return ClientUnavailable(f"cannot build the {name} environment ({why}): {exc}", offline)


@dataclass(frozen=True)
class PythonClient:
    """A venv holding `specs`; `imports` must import in it."""

    name: str
    env_var: str
    specs: tuple[str, ...]
    imports: tuple[str, ...]
    # Distributions at these versions in the running interpreter make a venv unnecessary.
    reuse_if: dict[str, str] = field(default_factory=dict)

    def directory(self) -> Path:
        return Path(os.environ.get(self.env_var) or cache_root() / f"{self.name}-venv")

    def _reusable_here(self) -> bool:
        if not self.reuse_if:
            return False
        try:
            return all(
                importlib.metadata.version(dist) == version
                for dist, version in self.reuse_if.items()
            )
        except importlib.metadata.PackageNotFoundError:
            return False

    def ensure(self) -> Path:
        """The python to run this client's programs with (building its venv if needed)."""
        if self._reusable_here():
            return Path(sys.executable)
        venv = self.directory()
        python = venv / "bin" / "python"

        def build(log: Path) -> None:
            run_logged([sys.executable, "-m", "venv", str(venv)], log, INSTALL_TIMEOUT_S)
            pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
            run_logged([*pip, "install", "--quiet", *self.specs], log, INSTALL_TIMEOUT_S)
            check = "; ".join(f"import {module}" for module in self.imports)
            run_logged([str(python), "-c", check], log, 300)
            installed = subprocess.run(
                [*pip, "list", "--format=json"], capture_output=True, text=True, check=True
            ).stdout
            names = {p["name"].lower() for p in json.loads(installed)}
            pulled = sorted(names.intersection(FORBIDDEN))
            if pulled:
                raise InstallFailed(f"{self.name}: {' '.join(self.specs)} pulled in {pulled}")

        try:
            cached_install(venv, " ".join(self.specs) + "\n", build)
        except InstallFailed as exc:
            raise _unavailable(self.name, exc) from None
        return python


@dataclass(frozen=True)
class NodeClients:
    """A folder whose node_modules holds `packages` (exact versions)."""

    name: str
    env_var: str
    packages: dict[str, str]

    def directory(self) -> Path:
        return Path(os.environ.get(self.env_var) or cache_root() / self.name)

    def ensure(self) -> Path:
        """The folder to run node in (its node_modules resolves the packages)."""
        npm = shutil.which("npm")
        if shutil.which("node") is None or npm is None:
            raise ClientUnavailable("node and npm are not installed", offline=False)
        folder = self.directory()
        manifest = {"name": "voxtral-compat-clients", "private": True, "type": "module"}

        def build(log: Path) -> None:
            folder.mkdir(parents=True)
            (folder / "package.json").write_text(
                json.dumps({**manifest, "dependencies": self.packages}, indent=2) + "\n"
            )
            run_logged(
                [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts"],
                log,
                INSTALL_TIMEOUT_S,
                cwd=folder,
            )

        try:
            cached_install(folder, json.dumps(self.packages, sort_keys=True) + "\n", build)
        except InstallFailed as exc:
            raise _unavailable(self.name, exc) from None
        return folder


# The versions the issue was measured with (and docs/compat.md names).
PIPECAT = PythonClient(
    "pipecat",
    "VOXTRAL_PIPECAT_VENV",
    ("pipecat-ai[openai]==1.14.0",),
    ("pipecat.services.openai.realtime.llm",),
    reuse_if={"pipecat-ai": "1.14.0"},
)
LIVEKIT = PythonClient(
    "livekit",
    "VOXTRAL_LIVEKIT_VENV",
    ("livekit-agents==1.8.9", "livekit-plugins-openai==1.8.9"),
    ("livekit.plugins.openai",),
)
AGENTS = PythonClient(
    "openai-agents",
    "VOXTRAL_AGENTS_VENV",
    ("openai-agents==0.24.0", "openai==3.57.0"),
    ("agents.realtime",),
)
NODE = NodeClients(
    "node-clients",
    "VOXTRAL_NODE_CLIENTS",
    {"openai": "6.49.0", "@openai/agents-realtime": "0.20.0", "ws": "8.23.0"},
)
ALL: tuple[PythonClient | NodeClients, ...] = (PIPECAT, LIVEKIT, AGENTS, NODE)


if __name__ == "__main__":  # `python tests/client_envs.py`: build them all ahead of time
    logging.basicConfig(level=logging.INFO)
    for env in ALL:
        t0 = time.perf_counter()
        where = env.ensure()
        sys.stdout.write(f"{env.name}: {where} ({time.perf_counter() - t0:.0f} s)\n")
