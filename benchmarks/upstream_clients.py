"""The proxy's upstream client, candidate against candidate: same proxy, same fast upstream, same run.

    python -m benchmarks.upstream_clients [--rounds 2] [--duration 5] [--only NAME ...]

nginx (one worker) answers every request with ``return 202`` and a fixed JSON body, so the proxy in
front of it is the bottleneck. One relay-idem proxy process per candidate (memory store, served as
``relay-idem proxy`` serves it), each differing only in the object its Forwarder sends through; then
``wrk -t1 -c32 -d5s`` against each in turn, in an order that alternates round by round. For each run:
requests per second, and the proxy process's CPU time per request (utime + stime from /proc).
Prints a markdown table of medians (issue 9; the results are in benchmarks/README.md).

Candidates: ``httptools`` (relay_idem.upstream_pool, the default), ``aiohttp`` (relay-idem's
aiohttp client), ``aiohttp-tuned`` (the same session without per-read timers: one deadline around
the wait for the headers instead), ``pyreqwest`` (Rust's reqwest under a Python API; only
if installed).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmarks.load.base import LoadSpec
from benchmarks.load.wrk import run_wrk
from benchmarks.procs import HOST, Child, cpu_seconds, free_port, wait_ready
from relay_idem.upstream import RawHeaders, RequestBody, Upstream, UpstreamBroken, UpstreamTimeout

CANDIDATES = ("httptools", "aiohttp", "aiohttp-tuned", "pyreqwest")
SCENARIOS = ("nokey", "first")
NGINX_BODY = '{"id":"msg_1","status":"queued"}'
NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{
        listen {host}:{port};
        location = /ready {{ return 200; }}
        location / {{ default_type application/json; return 202 '{body}'; }}
    }}
}}
"""


@contextmanager
def nginx_upstream(workdir: Path) -> Iterator[str]:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, host=HOST, port=port, body=NGINX_BODY))
    child = Child("nginx", ["nginx", "-c", str(conf), "-p", str(workdir)], workdir / "nginx.log")
    try:
        url = f"http://{HOST}:{port}"
        wait_ready(url + "/ready", [child])
        yield url
    finally:
        child.stop()


def open_candidate(name: str, upstream: str, timeout: float) -> Upstream:
    if name == "aiohttp-tuned":
        return TunedAiohttpUpstream(upstream, timeout=timeout)
    if name == "pyreqwest":
        return PyreqwestUpstream(upstream, timeout=timeout)
    from relay_idem.upstream import open_upstream

    return open_upstream(name, upstream, timeout=timeout)  # type: ignore[arg-type]


def serve(name: str, port: int, upstream: str) -> None:
    """One proxy process, as ``relay-idem proxy`` runs it, with the candidate as its upstream client."""
    import uvloop

    from relay_idem import server
    from relay_idem.config import Config
    from relay_idem.proxy import build_proxy_app

    config = Config(upstream=upstream, host=HOST, port=port, log_level="warning")
    app = build_proxy_app(config, upstream=open_candidate(name, upstream, config.upstream_timeout))
    server.configure_logging(config)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(server.serve(config, app=app))


class TunedAiohttpUpstream:
    """aiohttp without its per-read timeout timers: one deadline around the wait for the headers."""

    def __init__(self, base_url: str, *, timeout: float) -> None:
        import aiohttp

        from relay_idem.upstream_aiohttp import AiohttpUpstream

        self.inner = AiohttpUpstream(base_url, timeout=timeout)
        self.inner.timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout)
        self.timeout = timeout

    async def send(self, method: str, target: str, headers: RawHeaders, body: RequestBody) -> Any:
        async with asyncio.timeout(self.timeout):
            return await self.inner.send(method, target, headers, body)

    async def close(self) -> None:
        await self.inner.close()


class _PyreqwestResponse:
    complete = False  # its reader can't tell before the end: the Forwarder sends one empty message more

    def __init__(self, response: Any) -> None:
        self.response = response
        self.status: int = response.status
        self.headers: RawHeaders = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]

    async def body(self) -> AsyncIterator[bytes]:
        reader = self.response.body_reader
        while (chunk := await reader.read_chunk()) is not None:
            yield bytes(chunk)

    async def close(self) -> None:
        pass


class PyreqwestUpstream:
    """pyreqwest (reqwest/hyper on a Tokio thread): a candidate only, measured, not shipped."""

    def __init__(self, base_url: str, *, timeout: float) -> None:
        from pyreqwest.client import ClientBuilder

        self.base_url = base_url.rstrip("/")
        self.client = (
            ClientBuilder()
            .gzip(False)
            .follow_redirects(False)
            .default_cookie_store(False)
            .read_timeout(timedelta(seconds=timeout))
            .connect_timeout(timedelta(seconds=timeout))
            .max_connections(512)
            .http1_only()
            .build()
        )

    async def send(self, method: str, target: str, headers: RawHeaders, body: RequestBody) -> _PyreqwestResponse:
        from pyreqwest.exceptions import ConnectError, ReadTimeoutError

        builder = self.client.request(method, self.base_url + target)
        builder = builder.headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers])
        if isinstance(body, bytes):
            builder = builder.body_bytes(body)
        elif body is not None:
            builder = builder.body_bytes(b"".join([chunk async for chunk in body]))
        try:
            response = await builder.build().send()
        except ReadTimeoutError as exc:
            raise UpstreamTimeout(str(exc)) from exc
        except ConnectError as exc:
            raise UpstreamBroken(str(exc)) from exc
        return _PyreqwestResponse(response)

    async def close(self) -> None:
        await self.client.close()


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--only", nargs="*", choices=CANDIDATES)
    parser.add_argument("serve", nargs="*", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        name, port, upstream = options.serve
        serve(name, int(port), upstream)
        return
    names = [n for n in options.only or CANDIDATES if n != "pyreqwest" or installed("pyreqwest")]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-upstream-") as directory, ExitStack() as stack:
        workdir = Path(directory)
        upstream = stack.enter_context(nginx_upstream(workdir))
        proxies: dict[str, Child] = {}
        for name in names:
            port = free_port()
            argv = [sys.executable, "-m", "benchmarks.upstream_clients", name, str(port), upstream]
            child = proxies[name] = Child(name, argv, workdir / f"{name}.log")
            stack.callback(child.stop)
            child.url = f"http://{HOST}:{port}"
            wait_ready(child.url + "/_relay/healthz", [child])
        for child in proxies.values():  # warm-up: connections, caches
            run_wrk(LoadSpec(child.url, "nokey", uuid.uuid4().hex[:8], 1.0, options.connections), tally=False)
        for round_number in range(options.rounds):
            order = names if round_number % 2 == 0 else names[::-1]
            for scenario in SCENARIOS:
                for name in order:
                    child = proxies[name]
                    spec = LoadSpec(child.url, scenario, uuid.uuid4().hex[:8], options.duration, options.connections)
                    before = cpu_seconds(child.pid)
                    result = run_wrk(spec)
                    cpu_us = (cpu_seconds(child.pid) - before) / max(result.requests, 1) * 1e6
                    if result.non_2xx or any(result.errors.values()):
                        raise RuntimeError(f"{name} {scenario}: {result.status} {result.errors}")
                    results.setdefault((name, scenario), []).append((cpu_us, result.rps))
                    print(f"round {round_number + 1} {scenario:5} {name:13} {result.rps:8.0f} req/s "
                          f"{cpu_us:6.1f} us CPU/request", file=sys.stderr, flush=True)  # fmt: skip

    versions = ", ".join(f"{p} {installed(p)}" for p in ("aiohttp", "httptools", "uvloop", "pyreqwest") if installed(p))
    print(f"\nwrk -t1 -c{options.connections} -d{options.duration:g}s, {options.rounds} interleaved rounds, "
          f"medians; nginx `return 202` upstream; {versions}\n")  # fmt: skip
    print("| candidate | no key: CPU µs/request | no key: requests/s | first: CPU µs/request | first: requests/s |")
    print("|---|---|---|---|---|")
    for name in names:
        cells = []
        for scenario in SCENARIOS:
            runs = results[(name, scenario)]
            cells += [f"{statistics.median(c for c, _ in runs):.1f}", f"{statistics.median(r for _, r in runs):,.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
