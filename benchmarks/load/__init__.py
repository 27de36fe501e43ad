"""Load generators: ``wrk`` with a Lua script, or a built-in asyncio fallback with the same figures."""

from __future__ import annotations

import shutil
from collections.abc import Callable

from benchmarks.load.base import BODY, PATH, LoadResult, LoadSpec
from benchmarks.load.pygen import run_python
from benchmarks.load.wrk import run_wrk, wrk_version

__all__ = ["BODY", "PATH", "LoadResult", "LoadSpec", "pick", "run", "run_python", "run_wrk", "wrk_version"]


def pick(choice: str) -> str:
    """Resolve ``auto`` to ``wrk`` when it is on PATH, else ``python``."""
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if choice == "wrk" and not shutil.which("wrk"):
        raise RuntimeError("--loadgen wrk: wrk is not on PATH (apt-get install wrk)")
    return choice


def run(generator: str, spec: LoadSpec, stop: Callable[[], bool] | None = None) -> LoadResult:
    """Load for ``spec.duration`` seconds, or less once ``stop()`` (a cheap check, polled) is true."""
    return run_wrk(spec, stop=stop) if generator == "wrk" else run_python(spec, stop)
