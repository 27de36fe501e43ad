"""A process that calls one ``@idempotent`` function many times at once, for tests/test_functions_processes.py.

    python -m tests.function_worker REDIS_URL PREFIX KEY MODE CALLS TOTAL

Prints ``ready``, waits for a line on stdin (so that every process starts together), makes CALLS
concurrent calls, and prints one JSON line: each call's value, or ``"in_progress"``. Executions
are counted in Redis (``<PREFIX>:test:executions``), outside every process. MODE:

    wait     on_conflict="wait"; the function takes 0.5 s
    reject   on_conflict="reject"; the function returns only once the other TOTAL - 1 calls (over
             every process) have raised KeyInProgress, so exactly one runs whatever the timing
    hang     prints ``running`` inside the function and never returns (the test SIGKILLs it); lock_ttl 2 s
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any

import redis.asyncio

from relay_idem import KeyInProgress, RedisStore, idempotent

HANG_LOCK_TTL = 2.0
HANG_GUARD = 60.0


async def main(url: str, prefix: str, key: str, mode: str, calls: int, total: int) -> None:
    store = RedisStore.from_url(url, prefix=prefix)
    counters = redis.asyncio.Redis.from_url(url)
    executions, rejected = f"{prefix}:test:executions", f"{prefix}:test:rejected"

    @idempotent(
        store,
        key=lambda job: job["key"],
        on_conflict="wait" if mode == "wait" else "reject",
        wait_timeout=60,
        lock_ttl=HANG_LOCK_TTL if mode == "hang" else 10,
    )
    async def job(job: dict[str, str]) -> dict[str, Any]:
        await counters.incr(executions)
        if mode == "hang":
            print("running", flush=True)
            await asyncio.sleep(3600)
        elif mode == "reject":
            deadline = time.monotonic() + HANG_GUARD
            while int(await counters.get(rejected) or 0) < total - 1:
                assert time.monotonic() < deadline, "the other calls did not all raise KeyInProgress"
                await asyncio.sleep(0.02)
        else:
            await asyncio.sleep(0.5)
        return {"run": uuid.uuid4().hex, "pid": os.getpid()}

    async def one() -> Any:
        try:
            return await job({"key": key})
        except KeyInProgress:
            await counters.incr(rejected)
            return "in_progress"

    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    results = await asyncio.gather(*(one() for _ in range(calls)))
    print(json.dumps(results), flush=True)
    await counters.aclose()
    await store.close()


if __name__ == "__main__":
    url, prefix, key, mode, calls, total = sys.argv[1:]
    asyncio.run(main(url, prefix, key, mode, int(calls), int(total)))
