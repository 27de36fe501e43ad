"""The package as PyPI would get it: ``python -m build`` makes an sdist and a wheel that pass ``twine check``
and install in a fresh venv, where ``relay-idem --version`` runs."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from relay_idem import __version__

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run(*command: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_sdist_and_wheel_build_pass_twine_check_and_install_in_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # Without --sdist/--wheel, build makes the sdist first and the wheel from it: a file missing
    # from the sdist breaks the wheel too.
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT, cwd=tmp_path)
    sdist = dist / f"relay_idem-{__version__}.tar.gz"
    wheel = dist / f"relay_idem-{__version__}-py3-none-any.whl"
    assert sorted(dist.iterdir()) == [wheel, sdist]
    assert "PASSED" in run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel, cwd=tmp_path)

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"relay_idem/py.typed", "relay_idem/store/lua/begin.lua"} <= names
    assert f"relay_idem-{__version__}.dist-info/licenses/LICENSE" in names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    with tarfile.open(sdist) as archive:
        assert f"relay_idem-{__version__}/LICENSE" in archive.getnames()

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python, "install", "--quiet")
    run(*pip, wheel, cwd=tmp_path)
    assert run(venv / "bin" / "relay-idem", "--version", cwd=tmp_path).strip() == f"relay-idem {__version__}"
    where = run(python, "-c", "import relay_idem; print(relay_idem.__file__)", cwd=tmp_path)
    assert where.startswith(str(venv)), where

    # The sdist installs on its own too (pip builds it with hatchling); the wheel's dependencies are already there.
    run(*pip, "--no-deps", "--force-reinstall", sdist, cwd=tmp_path)
    assert run(venv / "bin" / "relay-idem", "--version", cwd=tmp_path).strip() == f"relay-idem {__version__}"
