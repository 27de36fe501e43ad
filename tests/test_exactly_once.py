"""Exactly once, for real: concurrent duplicates against 2 uvicorn workers sharing one Redis.

The app counts its executions in Redis, outside its own processes, so the count is the truth
about how often a message would have been sent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from tests.servers import free_port, serve

pytestmark = pytest.mark.slow

MESSAGE = {"to": "+5511999998888", "template": "lembrete_consulta", "language": "pt_BR"}


def wait_for_both_workers(base_url: str, *, timeout: float = 15.0) -> None:
    """New connections until two different worker processes have answered."""
    pids: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(pids) < 2:
        assert time.monotonic() < deadline, f"only workers {pids} answered within {timeout} s"
        with httpx.Client(base_url=base_url) as client:
            pids.add(client.get("/health").headers["x-worker-pid"])
        time.sleep(0.02)


def served_app(redis_url: str, prefix: str, on_conflict: str) -> Iterator[str]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {"SERVED_REDIS_URL": redis_url, "SERVED_PREFIX": prefix, "SERVED_ON_CONFLICT": on_conflict}
    args = ["uvicorn", "tests.served_app:app", "--port", str(port), "--workers", "2", "--log-level", "warning"]
    with serve(args, ready_url=f"{base_url}/health", env=env):
        wait_for_both_workers(base_url)
        yield base_url


@pytest.fixture
def reject_server(redis_url: str, prefix: str) -> Iterator[str]:
    yield from served_app(redis_url, prefix, "reject")


@pytest.fixture
def wait_server(redis_url: str, prefix: str) -> Iterator[str]:
    yield from served_app(redis_url, prefix, "wait")


async def fire(base_url: str, keys: list[str], copies: int) -> list[tuple[str, httpx.Response]]:
    """``copies`` concurrent requests for each key, interleaved, each on its own connection."""
    limits = httpx.Limits(max_connections=len(keys) * copies)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        requests = [
            (key, client.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": key}))
            for _ in range(copies)
            for key in keys
        ]
        responses = await asyncio.gather(*(request for _, request in requests))
    return [(key, response) for (key, _), response in zip(requests, responses, strict=True)]


def executions(redis_url: str, prefix: str, key: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.get(f"{prefix}:executions:{key}") or 0)
    finally:
        client.close()


def assert_exactly_once(
    redis_url: str, prefix: str, answers: list[tuple[str, httpx.Response]], allowed: set[int]
) -> None:
    by_key: dict[str, list[httpx.Response]] = {}
    for key, response in answers:
        by_key.setdefault(key, []).append(response)
    for key, responses in by_key.items():
        assert executions(redis_url, prefix, key) == 1, f"key {key} executed more than once"
        statuses = {response.status_code for response in responses}
        assert statuses <= allowed, f"unexpected statuses {statuses} for key {key}"
        bodies = {response.content for response in responses if response.status_code == 202}
        assert len(bodies) == 1, f"key {key} answered {len(bodies)} different bodies"


@pytest.mark.anyio
async def test_100_concurrent_duplicates_execute_once_with_on_conflict_reject(
    reject_server: str, redis_url: str, prefix: str
) -> None:
    key = f"pedido-{uuid.uuid4().hex[:8]}-lembrete"
    answers = await fire(reject_server, [key], copies=100)
    assert_exactly_once(redis_url, prefix, answers, allowed={202, 409})
    conflicts = [response for _, response in answers if response.status_code == 409]
    assert all(int(response.headers["retry-after"]) >= 1 for response in conflicts)
    assert all(response.headers["content-type"] == "application/problem+json" for response in conflicts)


@pytest.mark.anyio
async def test_several_keys_at_once_each_execute_once_with_on_conflict_reject(
    reject_server: str, redis_url: str, prefix: str
) -> None:
    keys = [f"appointment-{n}-{uuid.uuid4().hex[:6]}" for n in range(5)]
    answers = await fire(reject_server, keys, copies=30)
    assert_exactly_once(redis_url, prefix, answers, allowed={202, 409})


@pytest.mark.anyio
async def test_100_concurrent_duplicates_all_get_the_same_response_with_on_conflict_wait(
    wait_server: str, redis_url: str, prefix: str
) -> None:
    key = f"pedido-{uuid.uuid4().hex[:8]}-lembrete"
    answers = await fire(wait_server, [key], copies=100)
    assert_exactly_once(redis_url, prefix, answers, allowed={202})
    replayed = [response for _, response in answers if response.headers.get("idempotent-replayed") == "true"]
    assert len(replayed) == 99


@pytest.mark.anyio
async def test_several_keys_at_once_each_execute_once_with_on_conflict_wait(
    wait_server: str, redis_url: str, prefix: str
) -> None:
    keys = [f"shipment-{n}-{uuid.uuid4().hex[:6]}" for n in range(5)]
    answers = await fire(wait_server, keys, copies=30)
    assert_exactly_once(redis_url, prefix, answers, allowed={202})
