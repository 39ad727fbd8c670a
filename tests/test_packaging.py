"""coord as a user installs it: the wheel built from this checkout, and what a user's type
checker sees of it.

The wheel is built from a copy of the checkout (an in-tree build leaves ``build/`` behind,
whose stale files a later wheel would ship: a py.typed deleted from the tree would still
be in the wheel) and installed with ``pip install --target`` into a directory of its own.

Why not the suite's own coord: it is an editable install, which mypy does not see
through setuptools' import-hook finder, and a checkout on mypy's search path (the
current directory, MYPYPATH) is read as source, py.typed or not.  A directory on
PYTHONPATH, though, is on the ``sys.path`` that mypy asks the interpreter for, and
there a package counts only with a py.typed marker (PEP 561): so mypy runs in an empty
directory, with PYTHONPATH naming only the installed wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT

PROGRAM = Path(__file__).parent / "typing" / "service.py"

# Seconds each subprocess may take: a wheel build fetches setuptools (build isolation).
STEP_TIMEOUT = 180

# Not the checkout's own files to copy: environments, caches, build output.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "venv", "build", "dist", "*.egg-info", "__pycache__",
    ".*_cache", ".hypothesis")


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built as ``pip wheel`` builds it."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                  "-w", str(base / "dist"), str(source)], cwd=base)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}{built.stderr}"
    (found,) = (base / "dist").glob("coord-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding coord as ``pip install`` puts it (the wheel, no dependencies:
    those come from the suite's environment)."""
    target = tmp_path_factory.mktemp("site")
    done = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                 "--target", str(target), str(wheel)], cwd=target)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}{done.stderr}"
    return target


def _mypy_strict(program: Path, site: Path, workdir: Path) -> tuple[int, str]:
    """``mypy --strict program`` with coord found only in ``site``, as a user's mypy finds
    an installed package; returns (exit status, report)."""
    workdir.mkdir()
    shutil.copy(program, workdir / program.name)
    config = workdir / "mypy.ini"  # ours only: not a config found above the directory
    config.write_text("[mypy]\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    checked = _run([sys.executable, "-m", "mypy", "--strict", "--config-file", str(config),
                    "--cache-dir", str(workdir / ".mypy_cache"),
                    "--python-executable", sys.executable, "--no-error-summary",
                    "--show-error-codes", program.name], cwd=workdir, env=env)
    return checked.returncode, checked.stdout + checked.stderr


def test_wheel_ships_py_typed(wheel: Path):
    """The PEP 561 marker is in the wheel (package-data in pyproject.toml), at the
    package's top, next to __init__.py."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "coord/__init__.py" in names
    assert "coord/py.typed" in names, f"{wheel.name} lacks coord/py.typed"


def test_users_strict_mypy_sees_coords_types(installed: Path, tmp_path: Path):
    """``mypy --strict`` on a program using Client, client.lock(), Lock, Election and
    Session reports nothing: coord's annotations are what the user's checker uses.

    Without py.typed, mypy would skip coord ("module is installed, but missing library
    stubs or py.typed marker") and every coord value would be Any: the second run
    proves that this set-up tells the two apart, so the first run's silence means
    coord was read.
    """
    status, report = _mypy_strict(PROGRAM, installed, tmp_path / "typed")
    assert status == 0 and not report.strip(), f"mypy --strict on {PROGRAM.name}:\n{report}"

    untyped = tmp_path / "untyped"
    shutil.copytree(installed, untyped)
    (untyped / "coord" / "py.typed").unlink()
    status, report = _mypy_strict(PROGRAM, untyped, tmp_path / "unmarked")
    assert status == 1 and "missing library stubs or py.typed marker" in report, report
