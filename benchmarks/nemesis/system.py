"""The system under test, as real processes: Redis, the recording upstream, TCP relays and two proxies.

Two configurations (``CONFIGURATIONS``):

- ``sentinel``: a primary, one replica and three sentinels (``tests/redis_servers.py``), and proxies
  with ``--min-replicas 1``. The proxies find the primary through Sentinel, so the proxy-Redis
  connections are cut at Redis itself (``CLIENT KILL`` of every client that is not a sentinel or a
  replica) and slowed with ``CLIENT PAUSE``.
- ``standalone``: one Redis with ``appendfsync always`` (a restart keeps what it acknowledged),
  reached by the proxies through a TCP relay this process controls (``DelayProxy``), without
  ``--min-replicas``.

In both, each proxy process reaches the upstream through a relay of its own, and the upstream
listens on one port per relay, so each execution it records names the proxy process that sent it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.redis_servers import DelayProxy, RedisSentinel, RedisServer, start_sentinel, start_standalone
from tests.servers import free_port, stop_process_group, wait_until_ready

LOCK_TTL = 3.0
UPSTREAM_TIMEOUT = 5.0
PROXY_WORKERS = 2


@dataclass(frozen=True, slots=True)
class LogLine:
    t: float
    source: str
    text: str


@dataclass
class Logs:
    """Every line the proxies write to stderr, stamped when it arrives."""

    lines: list[LogLine] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def tap(self, source: str, pipe: object, copy: Path) -> threading.Thread:
        def read() -> None:
            with open(copy, "a", encoding="utf-8", errors="replace") as out:
                for raw in pipe:  # type: ignore[attr-defined]
                    text = raw.decode(errors="replace").rstrip()
                    line = LogLine(time.time(), source, text)
                    with self.lock:
                        self.lines.append(line)
                    out.write(f"{line.t:.3f} {text}\n")
                    out.flush()

        thread = threading.Thread(target=read, name=f"log-{source}", daemon=True)
        thread.start()
        return thread


class Upstream:
    """``benchmarks.nemesis.upstream`` on one port per proxy process; killed and restarted as a fault."""

    def __init__(self, ports: list[int], log: Path) -> None:
        self.ports = ports
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the upstream is already running")
        args = [sys.executable, "-m", "benchmarks.nemesis.upstream", "--ports", ",".join(map(str, self.ports))]
        self.process = subprocess.Popen(
            [*args, "--log", str(self.log)], start_new_session=True, stdout=subprocess.DEVNULL
        )
        wait_until_ready(f"http://127.0.0.1:{self.ports[0]}/", self.process, timeout=30)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


class Proxy:
    """``relay-idem proxy --workers 2``: a supervising parent and its workers (the fault targets)."""

    def __init__(self, name: str, options: list[str], logs: Logs, directory: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.options = options
        self.logs = logs
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "relay_idem", "proxy", "--port", str(self.port), *self.options]
        self.process = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.logs.tap(self.name, self.process.stderr, self.directory / f"{self.name}.log")
        wait_until_ready(f"{self.url}/_relay/healthz", self.process, timeout=60)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def workers(self) -> list[int]:
        """The worker processes: children of the parent, without multiprocessing's resource tracker."""
        if self.process is None:
            return []
        try:
            text = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            return []
        pids = []
        for pid in map(int, text.split()):
            with contextlib.suppress(OSError):
                if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
        return pids

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGCONT)
            stop_process_group(self.process)


class System:
    """One configuration, started; :meth:`stop` ends every process it started."""

    def __init__(self, configuration: str, directory: Path) -> None:
        if configuration not in CONFIGURATIONS:
            raise ValueError(f"unknown configuration {configuration!r}: {', '.join(CONFIGURATIONS)}")
        self.configuration = configuration
        self.min_replicas = 1 if configuration == "sentinel" else 0
        self.directory = directory
        self.logs = Logs()
        self.executions = directory / "executions.jsonl"
        self.sentinel: RedisSentinel | None = None
        self.server: RedisServer | None = None
        self.redis_relay: DelayProxy | None = None
        self.upstream = Upstream([free_port() for _ in range(2)], self.executions)
        self.upstream_relays = [DelayProxy(port) for port in self.upstream.ports]
        self.proxies: list[Proxy] = []
        self.prefix = f"nemesis-{configuration}"

    @property
    def redis_url(self) -> str:
        if self.sentinel is not None:
            return self.sentinel.url
        assert self.redis_relay is not None
        return self.redis_relay.url

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.configuration == "sentinel":
            self.sentinel = start_sentinel(timeout=60)
        else:
            self.server = start_standalone(config=["appendonly yes", "appendfsync always"])
            self.redis_relay = DelayProxy(self.server.port).start()
        self.upstream.start()
        for relay in self.upstream_relays:
            relay.start()
        for index, relay in enumerate(self.upstream_relays):
            options = [
                "--upstream", f"http://127.0.0.1:{relay.port}", "--redis", self.redis_url, "--prefix", self.prefix,
                "--workers", str(PROXY_WORKERS), "--lock-ttl", str(LOCK_TTL), "--upstream-timeout",
                str(UPSTREAM_TIMEOUT), "--log-level", "warning",
            ]  # fmt: skip
            if self.min_replicas:
                options += ["--min-replicas", str(self.min_replicas)]
            proxy = Proxy(f"proxy{index}", options, self.logs, self.directory)
            self.proxies.append(proxy)
            proxy.start()

    def primary(self) -> RedisServer:
        if self.sentinel is not None:
            return self.sentinel.primary
        assert self.server is not None
        return self.server

    def proxy_of_port(self, port: int) -> int:
        """Which proxy process sent an execution the upstream recorded on ``port``."""
        return self.upstream.ports.index(port)

    def healthy(self, timeout: float) -> list[str]:
        """Problems with the proxies, after the faults: each must be alive and serve ``/_relay/readyz``."""
        problems = []
        deadline = time.monotonic() + timeout
        for proxy in self.proxies:
            if not proxy.alive:
                problems.append(f"{proxy.name} exited with {proxy.process.returncode if proxy.process else None}")
                continue
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{proxy.url}/_relay/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    problems.append(f"{proxy.name}: /_relay/readyz not 200 within {timeout:.0f} s")
                    break
                time.sleep(0.2)
        return problems

    def stop(self) -> None:
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                proxy.stop()
        self.upstream.stop()
        for relay in [*self.upstream_relays, *([self.redis_relay] if self.redis_relay else [])]:
            relay.stop()
        if self.sentinel is not None:
            for server in self.sentinel.servers:
                server.resume()
            self.sentinel.stop()
        if self.server is not None:
            self.server.stop()


CONFIGURATIONS = ("sentinel", "standalone")


@contextlib.contextmanager
def running(configuration: str, directory: Path) -> Iterator[System]:
    system = System(configuration, directory)
    try:
        system.start()
        yield system
    finally:
        system.stop()
