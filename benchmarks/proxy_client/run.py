"""httpx vs aiohttp as the proxy's upstream client: same upstream, same load, same run.

Starts one upstream (``relay-idem demo --bare``) and two proxies in front of it, identical but for
``--upstream-client``, then loads them in alternating order, round after round, with wrk
(``-t1 -c32``), and prints a markdown table of median requests/s and p99 latency.

    .venv/bin/python -m benchmarks.proxy_client.run [--rounds 3] [--duration 8] [--connections 32]

Scenarios: ``nokey`` (POST without a key: pure forwarding, bodies streamed) and ``first`` (POST with
a new Idempotency-Key each time: buffered, fingerprinted, claimed and completed in the memory
store). Needs ``wrk`` on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

HERE = Path(__file__).parent
SCRIPT = HERE / "bench.lua"
CLIENTS = ("httpx", "aiohttp")
SCENARIOS = ("nokey", "first")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve(*args: str, ready: str) -> Iterator[None]:
    """``python -m relay_idem ARGS`` until the block ends (SIGTERM, then SIGKILL)."""
    process = subprocess.Popen([sys.executable, "-m", "relay_idem", *args], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"relay-idem {' '.join(args)} did not come up")
            try:
                httpx.get(ready, timeout=0.5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wrk(url: str, mode: str, duration: float, connections: int) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout=10s", "-s", str(SCRIPT), url,
            "--", mode, uuid.uuid4().hex[:8]]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    data = json.loads(line.removeprefix("RESULT "))
    if data["non2xx"] or data["errors"]:
        raise RuntimeError(f"{url} {mode}: {data['non2xx']} non-2xx responses, {data['errors']} socket errors")
    return {"rps": data["requests"] / data["seconds"], "p99_ms": data["p99_us"] / 1000, "p50_ms": data["p50_us"] / 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=32)
    options = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install -y wrk)")

    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    ports = {client: free_port() for client in CLIENTS}
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with ExitStack() as stack:
        upstream_args = ["demo", "--bare", "--port", str(upstream_port), "--log-level", "warning"]
        stack.enter_context(serve(*upstream_args, ready=f"{upstream}/v1/stats"))
        for client, port in ports.items():
            proxy_args = ["proxy", "--upstream", upstream, "--port", str(port), "--upstream-client", client]
            stack.enter_context(
                serve(*proxy_args, "--log-level", "warning", ready=f"http://127.0.0.1:{port}/_relay/healthz")
            )
        for port in ports.values():  # warm-up: pooled connections, caches
            wrk(f"http://127.0.0.1:{port}", "nokey", 2, options.connections)
        for round_number in range(options.rounds):
            order = CLIENTS if round_number % 2 == 0 else CLIENTS[::-1]
            for scenario in SCENARIOS:
                for client in order:
                    result = wrk(f"http://127.0.0.1:{ports[client]}", scenario, options.duration, options.connections)
                    results.setdefault((client, scenario), []).append(result)
                    print(f"round {round_number + 1} {scenario:5} {client:7} {result['rps']:8.0f} req/s "
                          f"p99 {result['p99_ms']:.2f} ms", file=sys.stderr, flush=True)  # fmt: skip

    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"httpx {version('httpx')}, aiohttp {version('aiohttp')}, wrk -t1 -c{options.connections} "
          f"-d{options.duration:g}s, {options.rounds} rounds, medians\n")  # fmt: skip
    print("| scenario | client | requests/s | p50 ms | p99 ms | per round (req/s) |")
    print("|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        for client in CLIENTS:
            runs = results[(client, scenario)]
            rps = statistics.median(run["rps"] for run in runs)
            p50 = statistics.median(run["p50_ms"] for run in runs)
            p99 = statistics.median(run["p99_ms"] for run in runs)
            rounds = ", ".join(f"{run['rps']:.0f}" for run in runs)
            print(f"| {scenario} | {client} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {rounds} |")


def version(package: str) -> str:
    from importlib.metadata import version as installed

    return installed(package)


if __name__ == "__main__":
    main()
