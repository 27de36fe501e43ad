"""SPEC §8.4 across processes on a real Redis: one key, 100 concurrent calls in 2 processes, one run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from relay_idem import KeyInProgress, RedisStore, idempotent
from relay_idem.keys import record_key

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).with_name("relay-idem")


@contextlib.contextmanager
def workers(
    redis_url: str, prefix: str, key: str, mode: str, calls: int, total: int
) -> Iterator[list[subprocess.Popen[str]]]:
    """``total / calls`` worker processes, each ready (its store built) when this yields."""
    args = [sys.executable, "-m", "tests.function_worker", redis_url, prefix, key, mode, str(calls), str(total)]
    processes = [
        subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(total // calls)
    ]
    try:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()  # waits, and closes the pipes


def run_together(processes: list[subprocess.Popen[str]]) -> list[object]:
    """Start every process's calls at once; every call's result."""
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    results: list[object] = []
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        results.extend(json.loads(out))
    return results


def executions(redis_url: str, prefix: str) -> int:
    with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
        return int(client.get(f"{prefix}:test:executions") or 0)


def test_wait_100_calls_in_2_processes_run_once_and_all_get_the_same_value(redis_url: str, prefix: str) -> None:
    with workers(redis_url, prefix, "reminder-42", "wait", 50, 100) as processes:
        results = run_together(processes)
    assert len(results) == 100
    assert executions(redis_url, prefix) == 1
    assert all(result == results[0] for result in results)
    assert isinstance(results[0], dict) and set(results[0]) == {"run", "pid"}
    # The record is one an operator can inspect, under the functions scope.
    inspect = ["inspect", "reminder-42", "--scope", "functions", "--redis", redis_url, "--prefix", prefix]
    inspected = subprocess.run([CONSOLE_SCRIPT, *inspect], capture_output=True, text=True, check=False, timeout=60)
    assert inspected.returncode == 0, inspected.stderr
    rows = dict(line.split(None, 1) for line in inspected.stdout.splitlines() if not line.startswith("redis key"))
    assert (rows["key"], rows["scope"], rows["state"], rows["status"]) == (
        "reminder-42",
        "functions",
        "completed",
        "200",
    )


def test_reject_100_calls_in_2_processes_run_once_and_the_rest_raise_key_in_progress(
    redis_url: str, prefix: str
) -> None:
    with workers(redis_url, prefix, "reminder-43", "reject", 50, 100) as processes:
        results = run_together(processes)
    values = [result for result in results if result != "in_progress"]
    assert len(values) == 1 and isinstance(values[0], dict)
    assert results.count("in_progress") == 99
    assert executions(redis_url, prefix) == 1


async def test_a_process_killed_inside_the_function_frees_the_key_after_lock_ttl(redis_url: str, prefix: str) -> None:
    with workers(redis_url, prefix, "killed", "hang", 1, 1) as [process]:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("go\n")
        process.stdin.flush()
        assert await asyncio.to_thread(process.stdout.readline) == "running\n"
        process.kill()
    store_key = record_key(prefix, "functions", "killed")
    with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
        left = client.pttl(store_key)
    # The claim outlives its owner by at most lock_ttl (2 s), never for good (-1: no expiry); -2: gone already.
    assert left == -2 or 0 < left <= 2000

    store = RedisStore.from_url(redis_url, prefix=prefix)

    @idempotent(store, key=lambda: "killed")
    async def retry() -> str:
        return "ran again"

    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                assert await retry() == "ran again"
                break
            except KeyInProgress:
                assert time.monotonic() < deadline, "the killed process's claim was never freed"
                await asyncio.sleep(0.1)
    finally:
        await store.close()
    assert executions(redis_url, prefix) == 1  # the killed run; ours is not counted by the worker
