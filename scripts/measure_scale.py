"""What one keyed request costs Redis, for the README's "Running at scale" section.

    .venv/bin/python scripts/measure_scale.py [--seconds 8]

On a private redis-server (free port, nothing saved):

1. Bytes per record: one typical small response (202, JSON, ~150 bytes) stored through the
   middleware, measured with ``MEMORY USAGE``; and ``used_memory`` per record over 10,000 records
   (which adds the keyspace and expiry dictionaries).
2. Redis CPU per request: ``relay-idem proxy`` (1 worker) in front of ``tests/proxy_upstream.py``,
   loaded by wrk (``benchmarks/load/request.lua``) with unique keys and with one replayed key; the
   server's ``used_cpu_user + used_cpu_sys`` over the requests served. One Redis core divided by
   that is how many such requests a Redis can take; divided by what one proxy worker served, how
   many proxy workers one Redis keeps up with.
3. With ``--failover``: completions acknowledged around a forced ``SENTINEL FAILOVER`` (primary,
   one replica — ``--replicas N`` for more — three sentinels) that are missing once it is over,
   with ``min_replicas`` from 0 to the number of replicas, and how long ``min_replicas=1`` answered store errors.
   ``--failover-only`` skips 1 and 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay_idem import IdempotencyMiddleware, RedisStore  # noqa: E402
from relay_idem.exceptions import StoreUnavailable  # noqa: E402
from relay_idem.store.base import Record, StoredResponse  # noqa: E402
from tests.redis_servers import RedisSentinel, RedisServer, start_sentinel, start_standalone  # noqa: E402
from tests.relay_processes import running_proxy, running_upstream  # noqa: E402

BODY = json.dumps(
    {
        "id": "msg_3f9c2a7e5b1d4c8e9a6f0b2d7c4e1a93",
        "to": "+5511999998888",
        "status": "queued",
        "template": "lembrete_consulta",
        "queuedAt": "2025-01-15T10:30:00.123456+00:00",
    }
).encode()


async def message_app(scope: dict[str, object], receive: object, send: object) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
    await send({"type": "http.response.start", "status": 202, "headers": headers})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": BODY})  # type: ignore[operator]


async def bytes_per_record(server: RedisServer) -> dict[str, float]:
    store = RedisStore.from_url(server.url, prefix="size")
    app = IdempotencyMiddleware(message_app, store=store)
    transport = httpx.ASGITransport(app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        request = b'{"to": "+5511999998888", "template": "lembrete_consulta", "language": "pt_BR"}'
        await client.post("/v1/messages", content=request, headers={"Idempotency-Key": "pedido-42-lembrete"})
        [key] = server.execute("KEYS", "size:*")
        one = int(server.execute("MEMORY", "USAGE", key, "SAMPLES", "0"))
        claim = await store.begin("size:claim", b"x" * 32, 10)
        assert claim.acquired
        in_progress = int(server.execute("MEMORY", "USAGE", "size:claim", "SAMPLES", "0"))
        before = int(server.execute("INFO", "memory")["used_memory"])
        count = 10_000
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    client.post("/v1/messages", content=request, headers={"Idempotency-Key": f"many-{n}"})
                    for n in range(start, start + 500)
                )
            )
        after = int(server.execute("INFO", "memory")["used_memory"])
    await store.close()
    return {"memory_usage": one, "in_progress": in_progress, "used_memory_per_record": (after - before) / count}


def redis_cpu(server: RedisServer) -> float:
    info = server.execute("INFO", "cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def wrk(url: str, mode: str, seconds: int) -> int:
    script = ROOT / "benchmarks" / "load" / "request.lua"
    run_id = f"{mode}-{time.time_ns()}"
    args = ["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", str(script), url, "--", mode, run_id, "32", "1"]
    output = subprocess.run(args, capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    match = re.search(r"^\s*(\d+) requests in", output, re.MULTILINE)
    assert match, output
    return int(match.group(1))


def redis_cost(server: RedisServer, seconds: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with (
        running_upstream() as upstream,
        running_proxy(upstream, "--redis", server.url, "--prefix", "cost") as (proxy, _process),
    ):
        url = f"{proxy}/work?id=cost"
        wrk(url, "first", 1)  # warm-up
        for mode in ("first", "replay"):
            cpu = redis_cpu(server)
            requests = wrk(url, mode, seconds)
            used = redis_cpu(server) - cpu
            results[mode] = {
                "requests_per_second": requests / seconds,
                "redis_cpu_us_per_request": used / requests * 1e6,
                "requests_per_redis_core": requests / used if used else float("inf"),
            }
    return results


async def failover_losses(topology: RedisSentinel, min_replicas: int, settle_seconds: float = 16.0) -> dict[str, float]:
    """One writer (claim + complete, ~50 a second) through a forced failover and until Sentinel demotes
    the old primary; then count the acknowledged completions the new primary lacks."""
    prefix = f"failover-{min_replicas}"
    store = RedisStore.from_url(topology.url, prefix=prefix, min_replicas=min_replicas)
    acknowledged: list[str] = []
    error_times: list[float] = []
    stop = asyncio.Event()
    response = Record(b"fp", time.time(), StoredResponse(200, (), b"sent"))

    async def write() -> None:
        count = 0
        while not stop.is_set():
            count += 1
            key = f"{prefix}:{count}"
            try:
                claim = await store.begin(key, b"fp", 10)
                assert claim.token is not None
                if await store.complete(key, claim.token, response, 600):
                    acknowledged.append(key)
            except StoreUnavailable:
                error_times.append(time.monotonic())
            await asyncio.sleep(0.02)

    writer = asyncio.create_task(write())
    await asyncio.sleep(1)
    failover_at = time.monotonic()
    await asyncio.to_thread(topology.failover)
    await asyncio.sleep(settle_seconds)  # Sentinel demotes the old primary ~10 s after the switch
    stop.set()
    await writer
    await store.close()
    primary = topology.primary
    missing = sum(1 for key in acknowledged if not primary.execute("EXISTS", key))
    window = error_times[-1] - error_times[0] if error_times else 0.0
    await asyncio.to_thread(topology.wait_ready)
    return {
        "acknowledged": len(acknowledged),
        "missing": missing,
        "store_errors": len(error_times),
        "error_window_s": round(window, 2),
        "first_error_after_failover_s": round(error_times[0] - failover_at, 2) if error_times else 0.0,
    }


async def failovers(replicas: int = 1) -> dict[str, dict[str, float]]:
    with start_sentinel(replicas=replicas) as topology:
        return {f"min_replicas={n}": await failover_losses(topology, n) for n in range(replicas + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--failover", action="store_true", help="also measure a forced Sentinel failover (~45 s)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the primary for --failover")
    parser.add_argument("--failover-only", action="store_true", help="only the failover measurement")
    options = parser.parse_args()
    if options.failover_only:
        print(json.dumps({"failover": asyncio.run(failovers(options.replicas))}, indent=2))
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed")
    with start_standalone() as server:
        sizes = asyncio.run(bytes_per_record(server))
        print(json.dumps({"bytes": sizes}, indent=2))
        cost = redis_cost(server, options.seconds)
        print(json.dumps({"cost": cost}, indent=2))
        for mode, numbers in cost.items():
            ratio = numbers["requests_per_redis_core"] / numbers["requests_per_second"]
            print(f"{mode}: one Redis core keeps up with ~{ratio:.0f} proxy workers like this one")
    if options.failover:
        print(json.dumps({"failover": asyncio.run(failovers())}, indent=2))


if __name__ == "__main__":
    main()
