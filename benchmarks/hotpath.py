"""The served hot path without the network: uvicorn's own HTTP protocol, fed from memory.

Each app (an import string, as uvicorn takes it) is served by uvicorn's ``HttpToolsProtocol`` on
uvloop over 32 in-memory connections: a connection sends its next request as soon as the response
to the last one is written, as wrk -c32 does. No sockets, no load generator, so the CPU time of
this one process is the cost of uvicorn + the app (+ the Redis client's own system calls, for a
middleware with a Redis store), and the numbers hold still on a busy machine far better than
wrk's. Used for benchmarks/README.md "The hot path".

    python -m benchmarks.hotpath --mode first benchmarks.apps.bare:app benchmarks.apps.relay_idem_middleware:app
    python -m benchmarks.hotpath --mode nokey --rounds 10 --requests 10000 APP APP ...

``--instructions`` counts instead of timing: user-space instructions per request under valgrind
(cachegrind), the difference between serving 1,300 and 300 requests divided by 1,000.
Deterministic to a few instructions in 100,000, whatever else the machine runs; it leaves out
system calls and cache misses. ``--once N`` (what that runs): N requests of the first app after a
warm-up, printing nothing.

The apps read ``BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from benchmarks.load.base import BODY, PATH

CONNECTIONS = 32
WARMUP_REQUESTS = 2000


def request_bytes(mode: str, number: int, run: str) -> bytes:
    lines = [
        f"POST {PATH} HTTP/1.1".encode(),
        b"Host: 127.0.0.1:8000",
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(BODY),
    ]
    if mode == "first":
        lines.append(f"Idempotency-Key: {run}-{number}".encode())
    elif mode == "replay":
        lines.append(f"Idempotency-Key: {run}-replay".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + BODY


class MemoryTransport(asyncio.Transport):
    """What uvicorn writes goes nowhere; its second write (headers, then body) ends a response."""

    def __init__(self, connection: Connection) -> None:
        super().__init__()
        self.connection = connection
        self.writes = 0
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        if self.writes % 2 == 0:
            self.connection.answered()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        info = {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}
        return info.get(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Connection:
    def __init__(self, load: Load) -> None:
        self.load = load
        self.protocol = HttpToolsProtocol(load.config, load.state, app_state={})
        self.protocol.connection_made(MemoryTransport(self))

    def send(self) -> None:
        load = self.load
        self.protocol.data_received(request_bytes(load.mode, next(load.numbers), load.run))

    def answered(self) -> None:
        load = self.load
        load.answered += 1
        if load.sent < load.total:
            load.sent += 1
            load.loop.call_soon(self.send)
        elif load.answered >= load.total and not load.done.done():
            load.done.set_result(None)


class Load:
    """One app under uvicorn's protocol; :meth:`run` serves ``total`` requests and returns CPU µs per request."""

    def __init__(self, app: Any, mode: str) -> None:
        self.config = Config(app, http="httptools", access_log=False, lifespan="off", log_level="warning")
        self.config.load()
        self.state = ServerState()
        self.mode = mode
        self.run_id = f"hotpath-{os.getpid()}-{time.time_ns()}"
        self.numbers = itertools.count()

    @property
    def run(self) -> str:
        return self.run_id

    async def serve(self, total: int) -> float:
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.total, self.sent, self.answered = total, 0, 0
        connections = [Connection(self) for _ in range(min(CONNECTIONS, total))]
        started = time.process_time()
        for connection in connections:
            self.sent += 1
            connection.send()
        await self.done
        elapsed = time.process_time() - started
        for connection in connections:
            connection.protocol.connection_lost(None)
        return elapsed * 1e6 / total


def load_app(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


async def compare(targets: list[str], mode: str, rounds: int, requests: int) -> None:
    loads = {target: Load(load_app(target), mode) for target in targets}
    for load in loads.values():
        await load.serve(min(WARMUP_REQUESTS, requests))
    results: dict[str, list[float]] = {target: [] for target in targets}
    for number in range(rounds):
        order = targets if number % 2 == 0 else targets[::-1]  # A B, then B A
        for target in order:
            results[target].append(await loads[target].serve(requests))
    base = results[targets[0]]
    for target in targets:
        cpu = results[target]
        ratio = statistics.median(b / c for b, c in zip(base, cpu, strict=True))
        print(f"{target:50s} {statistics.median(cpu):7.2f} µs CPU/request (min {min(cpu):.2f}), "
              f"throughput ratio to the first {ratio:.3f}")  # fmt: skip


async def once(target: str, mode: str, requests: int) -> None:
    load = Load(load_app(target), mode)
    await load.serve(300)
    await load.serve(requests)


def instructions(target: str, mode: str, requests: int) -> int:
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    command += [sys.executable, "-m", "benchmarks.hotpath", "--mode", mode, "--once", str(requests), target]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stderr
    found = re.search(r"I\s+refs:\s+([\d,]+)", output)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{output[-2000:]}")
    return int(found.group(1).replace(",", ""))


def count(targets: list[str], mode: str) -> None:
    base = None
    for target in targets:
        per_request = (instructions(target, mode, 1300) - instructions(target, mode, 300)) // 1000
        base = base or per_request
        print(f"{target:50s} {per_request:9,d} instructions/request ({per_request / base:.3f}x the first)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", help="apps as module:attribute; the first is the baseline")
    parser.add_argument("--mode", choices=("first", "replay", "nokey"), default="first")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10000, help="requests per app and round")
    parser.add_argument("--once", type=int, metavar="N", help="serve N requests of the first app, print nothing")
    parser.add_argument("--instructions", action="store_true", help="count instructions per request (valgrind)")
    args = parser.parse_args()
    if args.instructions:
        count(args.targets, args.mode)
        return
    import uvloop

    uvloop.install()
    if args.once:
        asyncio.run(once(args.targets[0], args.mode, args.once))
    else:
        asyncio.run(compare(args.targets, args.mode, args.rounds, args.requests))


if __name__ == "__main__":
    main()
