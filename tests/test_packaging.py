"""The package as users install it: a wheel carries the web page and the documented config.

The wheel test builds a real (non-editable) wheel from a clean copy of this checkout, installs
it with `--no-deps` into a fresh virtualenv outside the repository and runs `voxtral-server
demo` from a temporary directory. Installing torch, transformers and the rest into that
virtualenv from PyPI would take minutes and gigabytes, so it borrows them: a `.pth` file in
its site-packages holds the path of this project's site-packages. A path line in a `.pth`
file only appends that directory to sys.path; the `.pth` files found there are not
processed, so the project's editable finder (which maps voxtral_server to src/) stays
inactive, and the fresh site-packages comes first. The test checks both: the imported
package lives in the fresh virtualenv, and no `__editable__` finder was loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import REPO

from voxtral_server import resources
from voxtral_server.config import Settings

STATIC = REPO / "static"
CONFIG = REPO / "config.yaml"
# What a clean clone would not have: never copied into the build tree.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "logs", "out",
    "tiny-*", "artifacts",
)  # fmt: skip


def load_scale(cap: float = 4.0) -> float:
    """How much slower than an idle machine to expect (2 shared cores, other work running)."""
    per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    return min(cap, max(1.0, per_core))


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no output)"
    return "\n".join(text.splitlines()[-lines:])


def run(
    args: list[str | Path],
    timeout_s: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """stdout of a command that must succeed within timeout_s (scaled to the load)."""
    done = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout_s * load_scale(),
        cwd=cwd,
        env=env,
    )
    assert done.returncode == 0, (
        f"{' '.join(map(str, args[:3]))} ... exited {done.returncode}:\n"
        f"{(done.stdout + done.stderr)[-4000:]}"
    )
    return done.stdout


def same_files(installed: Path, source: Path) -> None:
    def listing(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
        }

    assert listing(installed) == listing(source), f"{installed} differs from {source}"


@dataclass(frozen=True)
class Installed:
    venv: Path
    site: Path  # the fresh site-packages, where the wheel went
    workdir: Path  # outside the repository: no ./config.yaml, no ./static
    env: dict[str, str]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel")
    # A clean copy: setuptools keeps an in-tree build/ between runs, and a file left in it
    # by an earlier build would reach the wheel even if the build no longer copies it.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", root, source], 120)
    (wheel,) = root.glob("voxtral_server-*.whl")

    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], 60)
    python = venv / "bin" / "python"
    run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], 60)
    site = Path(
        run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 30).strip()
    )
    # Only now: while pip runs, the project's site-packages must stay invisible, or pip
    # would see the editable voxtral-server there as the installed one.
    project = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "project-venv.pth").write_text("".join(f"{p}\n" for p in sorted(project)))

    workdir = root / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXTRAL_", "PYTHON"))}
    # The demo's tiny checkpoint goes to $XDG_CACHE_HOME/voxtral-server (cli.cache_dir()):
    # a fresh one keeps the user's cache out of it and builds the checkpoint the installed
    # package's way.
    env.update(HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(root / "cache"))
    yield Installed(venv, site, workdir, env)


PROBE = """
import json, sys
import voxtral_server
from voxtral_server import resources
from voxtral_server.config import Settings, load_settings
print(json.dumps({
    "package": voxtral_server.__file__,
    "static": str(resources.static_dir()),
    "sample": str(resources.sample_clip()),
    "config": str(resources.default_config_file()),
    "config_holds_the_defaults": load_settings(resources.default_config_file(), environ={})
        == Settings(),
    "editable_finders": sorted(m for m in sys.modules if m.startswith("__editable__")),
}))
"""


def test_the_wheel_installs_the_page_and_the_config_inside_the_package(
    installed: Installed,
) -> None:
    python = installed.venv / "bin" / "python"
    out = run([python, "-c", PROBE], 60, cwd=installed.workdir, env=installed.env)
    found = json.loads(out.splitlines()[-1])
    package = installed.site / "voxtral_server"
    assert Path(found["package"]) == package / "__init__.py", "imported the checkout, not the wheel"
    assert found["editable_finders"] == [], "the project's editable finder is active"
    assert Path(found["static"]) == package / "static"
    assert Path(found["sample"]) == package / "static" / "sample.wav"
    assert Path(found["config"]) == package / "config.yaml"
    assert found["config_holds_the_defaults"], "the packaged config.yaml differs from Settings()"
    same_files(package / "static", STATIC)
    assert (package / "config.yaml").read_bytes() == CONFIG.read_bytes()


def test_the_installed_demo_serves_the_page_from_any_directory(installed: Installed) -> None:
    from servers import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = installed.workdir / "demo.out"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                installed.venv / "bin" / "voxtral-server",
                "demo",
                "--port",
                str(port),
                "--tts",
                "none",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=installed.workdir,
            env=installed.env,
        )
    try:
        ready = _wait_ready(proc, f"{base}/readyz", log, timeout_s=120 * load_scale())
        assert ready.json()["status"] == "ready"
        page = httpx.get(f"{base}/")
        assert page.status_code == 200, f"GET / {page.status_code}:\n{tail(log)}"
        assert "<title>voxtral-server</title>" in page.text
        script = httpx.get(f"{base}/js/app.js")
        assert script.status_code == 200, f"GET /js/app.js {script.status_code}:\n{tail(log)}"
        assert script.content == (STATIC / "js" / "app.js").read_bytes()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30 * load_scale())
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the demo did not stop on SIGINT:\n{tail(log)}") from None
    output = log.read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{tail(log)}"
    assert "server stopped" in output, tail(log)
    # The server process itself ran the wheel: it names the installed config template.
    installed_config = installed.site / "voxtral_server" / "config.yaml"
    assert f"built-in defaults (every key documented in {installed_config})" in output, tail(log)


def _wait_ready(
    proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float
) -> httpx.Response:
    """Poll until 200, the process exits or timeout_s passes; each pause waits on the process."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == 200:
                return response
        except httpx.TransportError:
            pass  # not listening yet
        try:
            code = proc.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"the demo exited ({code}) before {url} was 200:\n{tail(log)}")
    raise AssertionError(f"{url} not 200 within {timeout_s:.0f} s:\n{tail(log)}")


def test_an_editable_install_finds_the_files_in_the_checkout() -> None:
    # This test run's own install is editable (src/ is the package): no copies in src/.
    assert resources.static_dir() == STATIC
    assert resources.sample_clip() == STATIC / "sample.wav"
    assert resources.default_config_file() == CONFIG


def test_without_the_page_create_app_says_where_it_looked_and_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from voxtral_server.api.app import create_app

    monkeypatch.setattr(resources, "_roots", lambda: [tmp_path])
    with caplog.at_level("ERROR", logger="voxtral_server.api.app"):
        app = create_app(Settings())
    message = caplog.text
    assert str(tmp_path / "static") in message and "pip install" in message
    assert not any(getattr(r, "name", None) == "static" for r in app.routes)
