"""Where and with what a run happened: date, machine, versions, exact command."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from benchmarks import procs
from benchmarks.load import wrk_version

PACKAGES = (
    "relay-idem", "uvicorn", "starlette", "uvloop", "httptools", "redis", "hiredis", "httpx", "aiohttp",
    "asgi-idempotency-header", "fastapi-idempotency", "fastapi", "idemkit", "asgiproxy",
)  # fmt: skip


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        if name == "relay-idem":  # not installed, but maybe importable from the work tree
            try:
                import relay_idem

                return str(getattr(relay_idem, "__version__", "work tree"))
            except Exception:  # any failure just means "not available"
                pass
        return "not installed"


def git_revision(repo: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "no commit yet"


def collect(repo: Path, command: str) -> dict[str, object]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "git": git_revision(repo),
        "machine": {
            "nproc": len(os.sched_getaffinity(0)),
            "cpu_model": cpu_model(),
            "memory_gib": memory_gib(),
            "kernel": platform.release(),
        },
        "versions": {
            "python": platform.python_version(),
            "redis-server": procs.redis_version(),
            "wrk": wrk_version(),
            "nginx": procs.nginx_version(),
            **{name: package_version(name) for name in PACKAGES},
        },
    }
