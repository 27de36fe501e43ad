"""Child processes: a private redis-server, the app (optionally behind the proxy) under test, and
for the proxy group an nginx fast upstream with the proxy under test in front of it.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import redis

from benchmarks.apps.common import UPSTREAM_URL_ENV
from benchmarks.grid import Server, Target

HOST = "127.0.0.1"
REDIS_SERVER = "redis-server"
NGINX = "nginx"
# Where nginx lives when it is not on PATH (Debian puts it in /usr/sbin, outside a user's PATH).
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
UVICORN_ARGS = ("--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning")
# How the relay-idem proxy target is started; {upstream}, {redis}, {host}, {port} are filled in.
PROXY_COMMAND = (
    "-m", "relay_idem", "proxy", "--upstream", "{upstream}", "--redis", "{redis}",
    "--host", "{host}", "--port", "{port}", "--log-level", "warning",
)  # fmt: skip
READY_PATH = "/v1/stats"
# The fast upstream's answer to every request: the shape of the message API's 202 (benchmarks.apps.common).
FAST_UPSTREAM_BODY = '{"id": "msg_5f1c0a9e2b7d4c38", "status": "queued", "queuedAt": "2026-11-30T12:00:00.000+00:00"}'
# One worker process each; keep-alive connections are never closed after N requests (nginx's default
# closes them after 1,000), so what is measured is the steady state, not reconnecting.
NGINX_MAIN = """daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{body}
}}
"""
NGINX_FAST_UPSTREAM = """    server {{
        listen {host}:{port};
        default_type application/json;
        location / {{ return 202 '{answer}'; }}
    }}"""
# SPEC §7's reference proxy: proxy_pass with a keep-alive upstream pool.
NGINX_PROXY = """    upstream fast {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
STOP_GRACE = 5.0
WORKER_SETTLE = 0.5  # after every worker process exists: time for the last one to start serving
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


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (uvicorn's and the proxy's workers), ``pid`` first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, queue = [pid], [pid]
    while queue:
        children = parents.get(queue.pop(), [])
        tree += children
        queue += children
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its live descendants."""
    total = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):  # exited between listing and reading
            total += cpu_seconds(member)
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process (VmRSS in /proc/<pid>/status); 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(pid: int) -> tuple[int, int]:
    """(summed RSS, number of processes) of ``pid`` and its live descendants."""
    members = process_tree(pid)
    return sum(rss_bytes(member) for member in members), len(members)


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
        self.url = ""  # base URL, for the servers
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
        """SIGTERM, then SIGKILL after STOP_GRACE s; workers it leaves behind are killed too."""
        if self.proc.poll() is not None:
            return
        descendants = process_tree(self.pid)[1:]
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_GRACE)
        for pid in descendants:  # only those still in the session we started (pids may be reused)
            with contextlib.suppress(OSError):
                if os.getsid(pid) == self.pid:
                    os.kill(pid, signal.SIGKILL)


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


def nginx_path() -> str | None:
    """The nginx executable: on PATH, or in an sbin directory."""
    return shutil.which(NGINX) or shutil.which(NGINX, path=os.pathsep.join(SBIN))


def nginx_version() -> str:
    exe = nginx_path()
    if exe is None:
        return "not installed"
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10)
    return (out.stderr or out.stdout).strip().rpartition("/")[2] or "unknown"


def ensure_nginx(progress: Callable[[str], None]) -> str:
    """nginx's path; installs it with apt-get (as root, or with password-less sudo) when it is missing."""
    exe = nginx_path()
    if exe is not None:
        return exe
    apt = shutil.which("apt-get")
    sudo: list[str] = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if apt is None or (sudo and shutil.which("sudo") is None):
        raise ProcessError("nginx is not installed and cannot be installed here (apt-get install nginx-light)")
    progress("nginx not found: apt-get install -y nginx-light")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in ([*sudo, apt, "update", "-qq"], [*sudo, apt, "install", "-y", "-qq", "nginx-light"]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise ProcessError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    exe = nginx_path()
    if exe is None:
        raise ProcessError("apt-get installed nginx-light, but no nginx executable was found")
    return exe


def nginx_child(name: str, body: str, log_dir: Path) -> Child:
    """nginx in the foreground, one worker process, with ``body`` as its ``http`` block's servers."""
    exe = nginx_path()
    if exe is None:
        raise ProcessError("nginx is not installed (apt-get install nginx-light)")
    prefix = log_dir / name
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(prefix=prefix, body=body))
    return Child(name, [exe, "-p", str(prefix), "-c", str(conf), "-e", "stderr"], log_dir / f"{name}.log")


def wait_ready(url: str, children: Sequence[Child], timeout: float = 30.0) -> None:
    """Until ``url`` answers a GET with 2xx (every child still alive meanwhile)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while True:
            for child in children:
                child.check_alive()
            try:
                if 200 <= client.get(url).status_code < 300:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {c.name}\n{c.log_tail()}" for c in children)
                raise ProcessError(f"{url} not ready after {timeout:.0f}s\n{tails}")
            time.sleep(0.05)


def uvicorn_argv(app: str, port: int, workers: int = 1) -> list[str]:
    argv = [sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", str(port), *UVICORN_ARGS]
    return argv + (["--workers", str(workers)] if workers > 1 else [])


def wait_workers(children: Sequence[Child], workers: int, timeout: float = 30.0) -> None:
    """With N workers, wait until each server has spawned them (the first to listen made it ready)."""
    deadline = time.monotonic() + timeout
    for child in children:
        while len(process_tree(child.pid)) <= workers:  # the supervisor, N workers (+ helpers)
            child.check_alive()
            if time.monotonic() > deadline:
                raise ProcessError(f"{child.name}: {workers} workers not started after {timeout:.0f}s")
            time.sleep(0.05)
    time.sleep(WORKER_SETTLE)


@contextlib.contextmanager
def serve(
    target: Target, env: Mapping[str, str], log_dir: Path, cwd: Path, workers: int = 1, proxy_args: Sequence[str] = ()
) -> Iterator[tuple[str, list[Child]]]:
    """Start ``target`` (and the proxy in front of it), each with ``workers`` worker processes.

    ``proxy_args`` are added to every ``relay-idem proxy`` command line (``--proxy-args``).

    Yields its base URL and the processes, app (or fast upstream) first; each child's ``url`` is its
    own base URL. The proxy under test is the child named ``proxy``.
    """
    children: list[Child] = []
    pythonpath = os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, **env, "PYTHONPATH": pythonpath}
    if target.fast_upstream:
        with _serve_fast_upstream(target, full_env, log_dir, cwd, workers, proxy_args, children) as base:
            yield base, children
        return
    try:
        app_port = free_port()
        argv = uvicorn_argv(target.app, app_port, workers)
        children.append(Child("app", argv, log_dir / "app.log", full_env, cwd))
        base = children[-1].url = f"http://{HOST}:{app_port}"
        if target.proxy:
            wait_ready(base + READY_PATH, children)
            children.append(_relay_idem_proxy(base, full_env, log_dir, cwd, workers, proxy_args))
            base = children[-1].url
        wait_ready(base + READY_PATH, children)
        if workers > 1:
            wait_workers(children, workers)
        yield base, children
    finally:
        for child in reversed(children):
            child.stop()


def _relay_idem_proxy(
    upstream: str, env: Mapping[str, str], log_dir: Path, cwd: Path, workers: int, extra: Sequence[str]
) -> Child:
    port = free_port()
    fields = {"upstream": upstream, "redis": env.get("BENCH_REDIS_URL", ""), "host": HOST, "port": str(port)}
    argv = [sys.executable, *(part.format(**fields) for part in PROXY_COMMAND), *extra]
    argv += ["--workers", str(workers)] if workers > 1 else []
    child = Child("proxy", argv, log_dir / "proxy.log", env, cwd)
    child.url = f"http://{HOST}:{port}"
    return child


@contextlib.contextmanager
def _serve_fast_upstream(
    target: Target,
    env: Mapping[str, str],
    log_dir: Path,
    cwd: Path,
    workers: int,
    proxy_args: Sequence[str],
    children: list[Child],
) -> Iterator[str]:
    """nginx answering a fixed 202 (``upstream``), and ``target``'s proxy in front of it (``proxy``)."""
    try:
        port = free_port()
        body = NGINX_FAST_UPSTREAM.format(host=HOST, port=port, answer=FAST_UPSTREAM_BODY)
        children.append(nginx_child("upstream", body, log_dir))
        upstream = children[-1].url = f"http://{HOST}:{port}"
        wait_ready(upstream + "/", children)
        port = free_port()
        if target.server is Server.NGINX:
            body = NGINX_PROXY.format(upstream=f"{HOST}:{int(upstream.rsplit(':', 1)[1])}", host=HOST, port=port)
            children.append(nginx_child("proxy", body, log_dir))
            children[-1].url = f"http://{HOST}:{port}"
        elif target.server is Server.RELAY_IDEM:
            children.append(_relay_idem_proxy(upstream, env, log_dir, cwd, workers, proxy_args))
        else:
            argv = uvicorn_argv(target.app, port, workers)
            children.append(Child("proxy", argv, log_dir / "proxy.log", {**env, UPSTREAM_URL_ENV: upstream}, cwd))
            children[-1].url = f"http://{HOST}:{port}"
        wait_ready(children[-1].url + "/", children)
        if workers > 1:
            wait_workers(children[-1:], workers)
        yield children[-1].url
    finally:
        for child in reversed(children):
            child.stop()
