"""What one keyed request costs Redis, for the README's "Running at scale" section.

    .venv/bin/python scripts/measure_scale.py [--seconds 8] [--failover [--replicas N]] [--faults] [--out DIR]

Writes DIR/results.json and DIR/RESULTS.md (DIR: benchmarks/scale/, committed) and, with the default
DIR, the README's scale figures; a part not measured this time keeps what the last run that measured
it wrote (failovers are kept per number of replicas).

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
4. With ``--faults``: the fault tests that print what they measured (slow Redis, Redis restarted, a
   proxy SIGKILLed holding a claim), run with ``pytest -s``; their figures and the bounds they enforce.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import envinfo, report, scale_report  # noqa: E402
from relay_idem import IdempotencyMiddleware, RedisStore  # noqa: E402
from relay_idem.exceptions import StoreUnavailable  # noqa: E402
from relay_idem.store.base import Record, StoredResponse  # noqa: E402
from tests.redis_servers import RedisSentinel, RedisServer, start_sentinel, start_standalone  # noqa: E402
from tests.relay_processes import running_proxy, running_upstream  # noqa: E402
from tests.test_faults_redis import FAIL_FAST_LIMIT  # noqa: E402
from tests.test_faults_workers import LOCK_TTL  # noqa: E402

# The fault tests whose printed figures --faults records: (test, pattern of the printed line, field).
FAULT_TESTS = (
    ("tests/test_faults_redis.py::test_slow_redis_fails_fast_and_never_hangs",
     r"answered 503 within ([\d.]+) s", "slow_redis_503_within_s"),
    ("tests/test_faults_redis.py::test_redis_killed_and_restarted_under_the_proxy",
     r"keyed requests served again ([\d.]+) s", "restart_recovery_s"),
    ("tests/test_faults_workers.py::test_a_worker_killed_while_holding_a_claim_frees_the_key_after_lock_ttl",
     r"the key was free again ([\d.]+) s", "sigkill_key_free_after_s"),
)  # fmt: skip

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
        keys_before = int(server.execute("DBSIZE"))
        count = 10_000
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    client.post("/v1/messages", content=request, headers={"Idempotency-Key": f"many-{n}"})
                    for n in range(start, start + 500)
                )
            )
        after = int(server.execute("INFO", "memory")["used_memory"])
        stored = int(server.execute("DBSIZE")) - keys_before  # a request the store timed out on stored nothing
    await store.close()
    return {"memory_usage": one, "in_progress": in_progress, "records": stored,
            "used_memory_per_record": (after - before) / stored}  # fmt: skip


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


def faults() -> dict[str, float]:
    """Run the fault tests that print their figures; the figures and the bounds the tests enforce."""
    found: dict[str, float] = {"slow_redis_bound_s": FAIL_FAST_LIMIT, "lock_ttl_s": LOCK_TTL,
                               "sigkill_bound_s": LOCK_TTL + 1.0}  # fmt: skip
    tests = [test for test, _, _ in FAULT_TESTS]
    done = subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"the fault tests failed:\n{done.stdout[-3000:]}")
    for _, pattern, field in FAULT_TESTS:
        match = re.search(pattern, done.stdout)
        if match is None:
            sys.exit(f"no line matching {pattern!r} in the fault tests' output")
        found[field] = float(match.group(1))
    return found


def write(out: Path, measured: dict[str, Any], command: str) -> None:
    """Merge ``measured`` into OUT/results.json (each part stamped with this run), write RESULTS.md, and the
    README's scale figures when OUT is benchmarks/scale/."""
    stamp = {k: v for k, v in envinfo.collect(ROOT, command).items() if k in ("date", "git", "command")}
    out.mkdir(parents=True, exist_ok=True)
    document = scale_report.load(out)
    for part, values in measured.items():
        if part == "failover":  # one entry per number of replicas
            document.setdefault("failover", {}).update({name: {**stamp, **v} for name, v in values.items()})
        else:
            document[part] = {**stamp, **values}
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / "RESULTS.md").write_text(scale_report.markdown(document))
    print(f"wrote {out / 'results.json'} and {out / 'RESULTS.md'}")
    if out.resolve() == scale_report.HERE.resolve():
        text = report.README.read_text()
        block = scale_report.readme_block(document)
        report.README.write_text(report.replace_block(text, block, scale_report.README_BEGIN, scale_report.README_END))
        print(f"wrote the scale figures of {report.README}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--failover", action="store_true", help="also measure a forced Sentinel failover (~45 s)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the primary for --failover")
    parser.add_argument("--failover-only", action="store_true", help="only the failover measurement")
    parser.add_argument("--faults", action="store_true", help="also run the fault tests that print figures (~30 s)")
    parser.add_argument("--out", type=Path, default=scale_report.HERE, help="where results.json and RESULTS.md go")
    options = parser.parse_args()
    measured: dict[str, Any] = {}
    if not options.failover_only:
        if shutil.which("wrk") is None:
            sys.exit("wrk is not installed")
        with start_standalone() as server:
            measured["bytes"] = asyncio.run(bytes_per_record(server))
            print(json.dumps({"bytes": measured["bytes"]}, indent=2))
            measured["cost"] = redis_cost(server, options.seconds)
            print(json.dumps({"cost": measured["cost"]}, indent=2))
    if options.failover or options.failover_only:
        runs = asyncio.run(failovers(options.replicas))
        measured["failover"] = {f"replicas={options.replicas}": runs}
        print(json.dumps({"failover": runs}, indent=2))
    if options.faults:
        measured["faults"] = faults()
        print(json.dumps({"faults": measured["faults"]}, indent=2))
    write(options.out, measured, "python scripts/measure_scale.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
