"""Run ``wrk`` with request.lua and parse the line its ``done()`` hook prints."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

from benchmarks.load.base import PATH, LoadResult, LoadSpec

SCRIPT = Path(str(files("benchmarks.load") / "request.lua"))
RESULT_PREFIX = "BENCH_RESULT "


def wrk_version() -> str:
    exe = shutil.which("wrk")
    if exe is None:
        return "not installed"
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
    return first.split("[")[0].replace("wrk", "").strip() or "unknown"


def wrk_argv(spec: LoadSpec, tally: bool = True) -> list[str]:
    return [
        "wrk", f"-t{spec.threads}", f"-c{spec.connections}", f"-d{max(spec.duration, 1.0):g}s",
        f"--timeout={spec.timeout:g}s", "-s", str(SCRIPT), spec.url + PATH,
        "--", spec.mode, spec.run_id, str(spec.burst), "1" if tally else "0",
    ]  # fmt: skip


def parse_output(stdout: str) -> LoadResult:
    """Turn request.lua's ``BENCH_RESULT {json}`` line into a LoadResult."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no {RESULT_PREFIX.strip()} line:\n{stdout[-2000:]}")
    data = json.loads(line[len(RESULT_PREFIX) :])
    status = {name: int(count) for name, count in data["status"].items()}
    errors = {name: int(count) for name, count in data["errors"].items() if name != "status"}
    if sum(status.values()) == 0 and data["requests"]:
        # response() was not defined (tally off): only wrk's ">399" count is known.
        status = {"2xx": int(data["requests"]) - int(data["errors"]["status"]), "4xx": int(data["errors"]["status"])}
    return LoadResult(
        generator="wrk",
        requests=int(data["requests"]),
        duration_s=int(data["duration_us"]) / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        status=status,
        errors=errors,
    )


def run_wrk(spec: LoadSpec, tally: bool = True, stop: Callable[[], bool] | None = None) -> LoadResult:
    """Run wrk for ``spec.duration`` seconds (wrk's minimum is 1 s), or until ``stop()`` is true.

    ``stop`` is polled every 0.1 s; wrk takes SIGINT as "end now" and still reports (done() runs).
    """
    argv = wrk_argv(spec, tally)
    limit = max(spec.duration, 1.0) + spec.timeout + 30
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            if stop is not None:
                deadline = time.monotonic() + limit
                while proc.poll() is None and time.monotonic() < deadline:
                    if stop():
                        proc.send_signal(signal.SIGINT)
                        break
                    time.sleep(0.1)
            stdout, stderr = proc.communicate(timeout=limit)
        except BaseException:  # timeout or Ctrl-C: never leave wrk running
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {stderr.strip() or stdout[-2000:]}")
    return parse_output(stdout)
