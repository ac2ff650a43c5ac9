"""A regular (non-editable) install ships every module of every layer: `package-dir` maps the
top-level folders to `embshard.<layer>`, and setuptools installs only the packages listed, so a
sub-package left off the list (planner/policies, datasets/convert) is silently missing from a
wheel while editable installs still find it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The standard library reads TOML from Python 3.11 on; the package itself supports 3.10.
tomllib = pytest.importorskip("tomllib")


@pytest.mark.slow
def test_install_ships_every_module(tmp_path: Path) -> None:
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    # Built from a copy: setuptools reuses the checkout's build/lib, whose leftovers from an
    # earlier build would end up in the wheel and hide a missing package.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in set(setup["package-dir"].values()):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-compile", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    expected = set()
    for package, folder in setup["package-dir"].items():
        installed_as = Path(*package.split("."))
        for source in (REPO / folder).rglob("*.py"):
            expected.add(installed_as / source.relative_to(REPO / folder))
    # The layer folders are not under embshard/, so each source file is counted once.
    missing = sorted(str(p) for p in expected if not (target / p).is_file())
    assert missing == []
