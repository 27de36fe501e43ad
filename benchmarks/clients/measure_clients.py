"""Which Redis client should the store's hot path use? One EVALSHA of begin.lua per call.

    .venv/bin/python -m benchmarks.clients.measure_clients [--calls 40000] [--rounds 3]

Every trial runs in a fresh subprocess under uvloop: ``--concurrency`` tasks share one
client and make ``--calls`` calls in all, alternating a fresh key (a claim: HSET +
PEXPIRE) and one repeated key (returns the stored pair). Clients run in turn, round after
round, and the table shows medians. CPU is ``time.process_time()`` (every thread of the
process, so valkey-glide's Rust threads count) and ``time.thread_time()`` of the event
loop thread; Redis CPU comes from ``INFO cpu``. By default a private ``redis-server`` is
started on a free port (``--port`` uses an existing one instead; it is FLUSHDB'd).

coredis and valkey-glide are not dependencies of relay-idem: ``pip install coredis valkey-glide``
to measure them too; a client whose package is not installed is skipped with a line saying so.
The results and the choice made from them: benchmarks/clients/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from relay_idem.store.scripts import LUA_BEGIN

BEGIN_LUA = LUA_BEGIN.encode()  # the store's own claim script
PAYLOAD = b"\x83\xa5state\xabin_progress\xa2fp\xd9@" + b"f" * 64 + b"\xa7started\xcbA\xd9\x00\x00\x00\x00\x00\x00"
TOKEN = b"0123456789abcdef0123456789abcdef"
LOCK_TTL_MS = 10_000
PREFIX = "relay-idem-bench"
HOST = "127.0.0.1"

Call = Callable[[str], Awaitable[Any]]
Factory = Callable[[int], contextlib.AbstractAsyncContextManager[Call]]


@contextlib.asynccontextmanager
async def redis_py_pool(port: int) -> AsyncIterator[Call]:
    from redis.asyncio import Redis

    client = Redis(host=HOST, port=port, max_connections=32, socket_timeout=0.5)
    script = client.register_script(BEGIN_LUA)
    try:
        yield lambda key: script(keys=[key], args=[PAYLOAD, TOKEN, LOCK_TTL_MS])
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def redis_py_single(port: int) -> AsyncIterator[Call]:
    from redis.asyncio import Redis

    client = Redis(host=HOST, port=port, single_connection_client=True, socket_timeout=0.5)
    script = client.register_script(BEGIN_LUA)
    try:
        yield lambda key: script(keys=[key], args=[PAYLOAD, TOKEN, LOCK_TTL_MS])
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def coredis_client(port: int) -> AsyncIterator[Call]:
    import coredis

    async with coredis.Redis(host=HOST, port=port, max_connections=32, stream_timeout=0.5) as client:
        script = client.register_script(BEGIN_LUA)

        async def call(key: str) -> Any:
            return await script(keys=[key], args=[PAYLOAD, TOKEN, LOCK_TTL_MS])

        yield call


@contextlib.asynccontextmanager
async def glide_client(port: int) -> AsyncIterator[Call]:
    from glide import GlideClient, GlideClientConfiguration, NodeAddress, Script

    config = GlideClientConfiguration([NodeAddress(HOST, port)], request_timeout=500)
    client = await GlideClient.create(config)
    script = Script(BEGIN_LUA)  # type: ignore[no-untyped-call]
    try:
        yield lambda key: client.invoke_script(script, keys=[key], args=[PAYLOAD, TOKEN, str(LOCK_TTL_MS)])
    finally:
        await client.close()


def _multiplexed(timeout: float | None) -> Factory:
    @contextlib.asynccontextmanager
    async def factory(port: int) -> AsyncIterator[Call]:
        from relay_idem.store.multiplexed import MultiplexedRedis

        client = MultiplexedRedis(HOST, port, timeout=timeout)
        sha = client.register_script(BEGIN_LUA)
        try:
            yield lambda key: client.execute("EVALSHA", sha, 1, key, PAYLOAD, TOKEN, LOCK_TTL_MS)
        finally:
            await client.aclose()

    return factory


CLIENTS: dict[str, tuple[str, Factory]] = {
    "redis-py-pool": ("(a) redis-py asyncio + hiredis, pool max_connections=32", redis_py_pool),
    "redis-py-single": ("(b) redis-py asyncio + hiredis, single_connection_client", redis_py_single),
    "coredis": ("(c) coredis, max_connections=32 (multiplexes)", coredis_client),
    "glide": ("(d) valkey-glide async (Rust core, multiplexed)", glide_client),
    "multiplexed": ("(e) multiplexed.py, 0.5 s per-call timeout", _multiplexed(0.5)),
    "multiplexed-notimeout": ("(e') multiplexed.py, no per-call timeout", _multiplexed(None)),
}


# Clients that need a package relay-idem does not depend on: name -> (module, PyPI package).
OPTIONAL = {"coredis": ("coredis", "coredis"), "glide": ("glide", "valkey-glide")}


def missing_package(name: str) -> str | None:
    """The PyPI package to install for client ``name``, when it is not importable; else None."""
    module, package = OPTIONAL.get(name, ("redis", "redis"))
    return package if importlib.util.find_spec(module) is None else None


def redis_cpu(port: int) -> float:
    """Seconds of CPU redis-server has used (user + sys), read over a plain socket."""
    with socket.create_connection((HOST, port), timeout=2) as sock:
        sock.sendall(b"INFO cpu\r\n")
        data = sock.recv(65536)
        header_end = data.index(b"\r\n") + 2
        while len(data) < header_end + int(data[1 : header_end - 2]) + 2:  # "$<len>\r\n<body>\r\n"
            data += sock.recv(65536)
    fields = dict(line.split(":", 1) for line in data.decode().splitlines() if ":" in line)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


async def measure(name: str, port: int, calls: int, concurrency: int) -> dict[str, Any]:
    per_task = calls // concurrency
    fresh = [[f"{PREFIX}:{name}:k:{t}:{i}" for i in range(per_task // 2)] for t in range(concurrency)]
    hot = f"{PREFIX}:{name}:hot"
    warm = [[f"{PREFIX}:{name}:warm:{t}:{i}" for i in range(20)] for t in range(concurrency)]

    async with CLIENTS[name][1](port) as call:

        async def warm_up(keys: list[str]) -> None:  # connect, load the script, fill the pool
            for key in keys:
                await call(key)

        await asyncio.gather(*(warm_up(keys) for keys in warm))

        async def task(keys: list[str]) -> int:
            claimed = 0
            for key in keys:  # alternate: claim a fresh key, then read the repeated one
                if await call(key) is None:
                    claimed += 1
                if await call(hot) is None:
                    claimed += 1
            return claimed

        redis0 = redis_cpu(port)
        wall0, cpu0, loop0 = time.perf_counter(), time.process_time(), time.thread_time()
        claimed = sum(await asyncio.gather(*(task(keys) for keys in fresh)))
        wall = time.perf_counter() - wall0
        cpu, loop_cpu = time.process_time() - cpu0, time.thread_time() - loop0
        redis_used = redis_cpu(port) - redis0
        last = await call(hot)

    done = 2 * sum(len(keys) for keys in fresh)
    expected = done // 2 + 1  # every fresh key once, the repeated key on its first call
    ok = claimed == expected and isinstance(last, list) and [bytes(v) for v in last] == [TOKEN, PAYLOAD]
    return {
        "calls": done,
        "calls_per_s": done / wall,
        "cpu_us": cpu / done * 1e6,
        "loop_cpu_us": loop_cpu / done * 1e6,
        "redis_cpu_us": redis_used / done * 1e6,
        "ok": ok,
    }


def run_worker(name: str, port: int, calls: int, concurrency: int) -> None:
    import uvloop

    result = uvloop.run(measure(name, port, calls, concurrency))
    print(json.dumps(result), flush=True)


def flushdb(port: int) -> None:
    with socket.create_connection((HOST, port), timeout=2) as sock:
        sock.sendall(b"FLUSHDB\r\n")
        sock.recv(64)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server(port: int | None, *extra: str) -> Any:
    if port is not None:
        yield port
        return
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: install it or pass --port of a running Redis")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                flushdb(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def trial(name: str, port: int, args: argparse.Namespace) -> dict[str, Any] | str:
    flushdb(port)
    command = [sys.executable, "-m", "benchmarks.clients.measure_clients", "--worker", name, "--port", str(port)]
    command += ["--calls", str(args.calls), "--concurrency", str(args.concurrency)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.trial_timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"timed out after {args.trial_timeout} s"
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40_000, help="calls per trial, all tasks together")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset of: " + ",".join(CLIENTS))
    parser.add_argument("--port", type=int, help="use the Redis already on 127.0.0.1:PORT (it gets FLUSHDB)")
    parser.add_argument("--trial-timeout", type=float, default=40.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        run_worker(args.worker, args.port, args.calls, args.concurrency)
        return

    names = [name for name in args.clients.split(",") if name]
    unknown = set(names) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown clients: {', '.join(sorted(unknown))}")
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    errors: dict[str, str] = {}
    for name in names:
        package = missing_package(name)
        if package is not None:
            errors[name] = f"skipped: {package} is not installed (pip install {package})"
            print(f"skipping {name}: {package} is not installed (pip install {package})", file=sys.stderr)
    started = time.monotonic()
    with redis_server(args.port) as port:
        for round_ in range(args.rounds):
            for name in names:
                if name in errors:
                    continue
                result = trial(name, port, args)
                if isinstance(result, str):
                    errors[name] = result
                    print(f"round {round_ + 1}: {name}: FAILED: {result}", file=sys.stderr)
                    continue
                results[name].append(result)
                print(
                    f"round {round_ + 1}: {name}: {result['calls_per_s']:,.0f} calls/s, "
                    f"{result['cpu_us']:.1f} us CPU/call, ok={result['ok']}",
                    file=sys.stderr,
                )

    print(
        f"\n{args.calls:,} EVALSHA calls of begin.lua per trial (half claims of fresh keys, half reads of one "
        f"repeated key), {args.concurrency} tasks, uvloop, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
        f"median of {args.rounds} alternating rounds ({time.monotonic() - started:.0f} s in all).\n"
    )
    print("| client | calls/s | process CPU µs/call | loop-thread CPU µs/call | redis-server CPU µs/call | ok |")
    print("|---|---:|---:|---:|---:|---|")
    for name in names:
        label = CLIENTS[name][0]
        runs = results[name]
        if not runs:
            error = errors.get(name, "?")
            print(f"| {label} | {error if error.startswith('skipped') else 'failed: ' + error} | | | | |")
            continue

        def med(field: str, runs: list[dict[str, Any]] = runs) -> float:
            return float(statistics.median(run[field] for run in runs))

        ok = "yes" if all(run["ok"] for run in runs) else "NO"
        print(
            f"| {label} | {med('calls_per_s'):,.0f} | {med('cpu_us'):.1f} | {med('loop_cpu_us'):.1f} "
            f"| {med('redis_cpu_us'):.1f} | {ok} |"
        )


if __name__ == "__main__":
    main()
