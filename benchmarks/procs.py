"""Child processes: a private redis-server and the app (optionally behind the proxy) under test.

Every child runs in its own session, so a Ctrl-C in the terminal reaches only the
harness, which then stops the children itself (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import redis

from benchmarks.grid import Target

HOST = "127.0.0.1"
REDIS_SERVER = "redis-server"
UVICORN_ARGS = ("--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning")
# How the relay-idem proxy target is started; {upstream}, {redis}, {host}, {port} are filled in.
PROXY_COMMAND = (
    "-m", "relay_idem", "proxy", "--upstream", "{upstream}", "--redis", "{redis}",
    "--host", "{host}", "--port", "{port}", "--log-level", "warning",
)  # fmt: skip
READY_PATH = "/v1/stats"
STOP_GRACE = 5.0
_CLOCK_TICK = os.sysconf("SC_CLK_TCK")


class ProcessError(RuntimeError):
    """A child process could not be started or did not become ready."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / _CLOCK_TICK, steal / _CLOCK_TICK


def wait_quiet(limit_pct: float, timeout: float, sample: float = 0.5) -> float:
    """Wait until the machine's busy CPU over ``sample`` s is below ``limit_pct`` % of one CPU.

    Our own children must be idle meanwhile. Gives up after ``timeout`` s; returns the seconds waited.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        machine, own = machine_cpu_seconds()[0], own_cpu_seconds()
        time.sleep(sample)
        busy = (machine_cpu_seconds()[0] - machine) - (own_cpu_seconds() - own)
        if busy * 100 / sample < limit_pct:
            break
    return time.monotonic() - started


def own_cpu_seconds() -> float:
    """CPU seconds of this process plus its waited-for children (wrk)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


class Child:
    """One subprocess with its output in ``log``; ``stop()`` is idempotent."""

    def __init__(
        self, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ProcessError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_GRACE)


def redis_version() -> str:
    exe = shutil.which(REDIS_SERVER)
    if exe is None:
        return "not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    return next((part[2:] for part in out.split() if part.startswith("v=")), out.strip())


@contextlib.contextmanager
def redis_server(log_dir: Path, timeout: float = 10.0) -> Iterator[tuple[str, Child]]:
    """A throw-away redis-server on a free port: no persistence, bound to 127.0.0.1."""
    exe = shutil.which(REDIS_SERVER)
    if exe is None:
        raise ProcessError("redis-server not found on PATH")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        argv = [
            exe, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", workdir, "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip
        child = Child("redis-server", argv, log_dir / "redis-server.log")
        try:
            client = redis.Redis(host=HOST, port=port, socket_timeout=1.0)
            deadline = time.monotonic() + timeout
            while True:
                child.check_alive()
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise ProcessError(f"redis-server not answering on {port}") from None
                    time.sleep(0.05)
            client.close()
            yield f"redis://{HOST}:{port}/0", child
        finally:
            child.stop()


def wait_ready(url: str, children: Sequence[Child], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while True:
            for child in children:
                child.check_alive()
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {c.name}\n{c.log_tail()}" for c in children)
                raise ProcessError(f"{url} not ready after {timeout:.0f}s\n{tails}")
            time.sleep(0.05)


def uvicorn_argv(app: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", str(port), *UVICORN_ARGS]


@contextlib.contextmanager
def serve(target: Target, env: Mapping[str, str], log_dir: Path, cwd: Path) -> Iterator[tuple[str, list[Child]]]:
    """Start ``target`` (and the proxy in front of it); yield its base URL and processes, app first."""
    children: list[Child] = []
    pythonpath = os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, **env, "PYTHONPATH": pythonpath}
    try:
        app_port = free_port()
        children.append(Child("app", uvicorn_argv(target.app, app_port), log_dir / "app.log", full_env, cwd))
        base = f"http://{HOST}:{app_port}"
        if target.proxy:
            wait_ready(base + READY_PATH, children)
            proxy_port = free_port()
            fields = {"upstream": base, "redis": env.get("BENCH_REDIS_URL", ""), "host": HOST, "port": str(proxy_port)}
            argv = [sys.executable, *(part.format(**fields) for part in PROXY_COMMAND)]
            children.append(Child("proxy", argv, log_dir / "proxy.log", full_env, cwd))
            base = f"http://{HOST}:{proxy_port}"
        wait_ready(base + READY_PATH, children)
        yield base, children
    finally:
        for child in reversed(children):
            child.stop()
