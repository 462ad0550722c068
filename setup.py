"""Why this file exists: the wheel must carry the web page and the documented config.

static/ and config.yaml stay at the top of the repository, outside the package directory
src/, and pyproject.toml's package-data can only name files inside a package's directory.
This build_py hook adds them to the package at build time, so `pip install .`, `pip wheel .`
and `pip install git+URL` install them as voxtral_server/static/ and voxtral_server/config.yaml
(and an sdist includes them). Everything else is configured in pyproject.toml.

An editable install (`pip install -e .`) maps the package to src/ and does not copy them:
voxtral_server/resources.py finds them at the top of the checkout instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

PACKAGE = "voxtral_server"
TOP_LEVEL = ("static", "config.yaml")  # relative to this file, the directory builds run in


def top_level_files() -> list[str]:
    files: list[str] = []
    for name in TOP_LEVEL:
        path = Path(name)
        if not path.exists():  # never build a package that serves no page
            raise FileNotFoundError(f"{path.resolve()}: missing, the package needs it")
        if path.is_file():
            files.append(name)
        else:
            files += sorted(p.as_posix() for p in path.rglob("*") if p.is_file())
    return files


class BuildPyWithTopLevelFiles(build_py):
    """Adds TOP_LEVEL to the package's data files: the one list from which setuptools copies
    files into the wheel (run), reports outputs (strict editable installs) and fills an sdist."""

    def _top_level_entry(self) -> tuple[str, str, str, list[str]]:
        # (package, source dir, build dir, file names relative to both), like setuptools' own.
        return PACKAGE, "", os.path.join(self.build_lib, PACKAGE), top_level_files()

    def _get_data_files(self) -> list[Any]:
        return [*super()._get_data_files(), self._top_level_entry()]

    def get_data_files_without_manifest(self) -> list[Any]:  # what sdist uses
        return [*super().get_data_files_without_manifest(), self._top_level_entry()]


setup(cmdclass={"build_py": BuildPyWithTopLevelFiles})
