"""Files that come with the package: the web page (static/), its sample clip, config.yaml.

They live at the top of the repository, where they are edited. A wheel (`pip install .`,
`pip install git+URL`) carries copies inside the package, made by setup.py's build hook, and
they are found there through `importlib.resources`. An editable install or a run from the
source tree has no such copies: there they are found at the top of the checkout.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

PACKAGE = "voxtral_server"


class MissingResource(FileNotFoundError):
    """A file that should come with the package is not installed; the message says where it
    was looked for and how to get it."""


def _roots() -> list[Path]:
    """Where package files may be, in order: the installed package, then the checkout."""
    roots = []
    package = files(PACKAGE)
    # pip unpacks wheels, so the package is a directory; a zipped one (zipimport) is not
    # supported: StaticFiles and libsndfile need real files.
    if isinstance(package, Path):
        roots.append(package)
    # src/ is the package in a checkout; its parent is recognised by pyproject.toml, so an
    # unrelated `static/` next to an installed package in site-packages is never picked up.
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        roots.append(checkout)
    return roots


def _find(name: str, exists: Callable[[Path], bool]) -> Path:
    roots = _roots()
    for root in roots:
        if exists(root / name):
            return root / name
    looked = ", ".join(str(root / name) for root in roots) or "(no package directory)"
    raise MissingResource(
        f"{name} is not installed with voxtral_server (looked in: {looked}). Install the "
        "package with pip from a source checkout, a git URL or a wheel built from one "
        "(`pip install .`, `pip install git+URL`, `pip wheel .`): setup.py copies static/ and "
        "config.yaml into it; or run from the checkout (`pip install -e .`)."
    )


def static_dir() -> Path:
    """The web page's directory (index.html, js/, style.css, sample.wav)."""
    return _find("static", Path.is_dir)


def sample_clip() -> Path:
    """The sample question the demo answers (and the browser tests' fake microphone)."""
    return _find("static/sample.wav", Path.is_file)


def default_config_file() -> Path:
    """The documented config.yaml with every key at its default: the template to copy."""
    return _find("config.yaml", Path.is_file)
