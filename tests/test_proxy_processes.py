"""``relay-idem proxy`` as a real process in front of a real upstream, over real sockets (SPEC §4).

The upstream is ``tests/proxy_upstream.py`` under uvicorn; it counts its executions itself, in its
own process, so "executed once" is counted outside the proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.proxy_upstream import STREAM_FIRST, STREAM_REST, big_body
from tests.servers import free_port, serve

pytestmark = pytest.mark.anyio

MESSAGE = b'{"to": "+5511999998888", "template": "lembrete_consulta", "language": "pt_BR"}'
PROBLEM = "application/problem+json"


def upstream_args(port: int) -> list[str]:
    return ["uvicorn", "tests.proxy_upstream:app", "--port", str(port), "--log-level", "warning"]


def proxy_args(upstream: str, port: int, *options: str) -> list[str]:
    return ["relay_idem", "proxy", "--upstream", upstream, "--port", str(port), "--log-level", "warning", *options]


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serve(upstream_args(port), ready_url=f"{url}/calls"):
        yield url


@pytest.fixture(scope="module")
def proxy(upstream: str) -> Iterator[str]:
    """A memory-store proxy with a 1 s upstream timeout."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serve(proxy_args(upstream, port, "--upstream-timeout", "1"), ready_url=f"{url}/_relay/healthz"):
        yield url


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=15) as client:
        yield client


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def keyed(key: str | None = None) -> dict[str, str]:
    return {"Idempotency-Key": key or new_id(), "Content-Type": "application/json"}


async def calls(client: httpx.AsyncClient, upstream: str, name: str) -> dict[str, int]:
    response = await client.get(f"{upstream}/calls", params={"id": name})
    result: dict[str, int] = response.json()
    return result


# --- one proxy process, memory store -------------------------------------------------------------


@pytest.mark.parametrize("with_key", [True, False], ids=["keyed", "unkeyed"])
async def test_the_first_chunk_arrives_before_the_upstream_finishes(
    proxy: str, upstream: str, client: httpx.AsyncClient, with_key: bool
) -> None:
    name = new_id()
    headers = keyed() if with_key else {}
    async with client.stream("POST", f"{proxy}/stream", params={"id": name}, headers=headers) as response:
        chunks = response.aiter_raw()
        # The upstream holds the rest back until /release: a proxy that buffered would never get here.
        first = await asyncio.wait_for(anext(chunks), timeout=5)
        assert first == STREAM_FIRST
        await client.get(f"{upstream}/release", params={"id": name})
        rest = b"".join([chunk async for chunk in chunks])
    assert rest == b"".join(STREAM_REST)


async def test_a_2_mib_response_is_delivered_whole_and_its_repeat_does_not_execute(
    proxy: str, upstream: str, client: httpx.AsyncClient
) -> None:
    name, size = new_id(), 2 * 1024 * 1024
    headers = keyed()
    first = await client.post(f"{proxy}/big", params={"id": name, "size": size}, content=MESSAGE, headers=headers)
    assert first.status_code == 200
    assert len(first.content) == size
    assert hashlib.sha256(first.content).digest() == hashlib.sha256(big_body(size)).digest()

    repeat = await client.post(f"{proxy}/big", params={"id": name, "size": size}, content=MESSAGE, headers=headers)
    assert repeat.status_code == 200
    assert repeat.headers["idempotent-replayed"] == "true"
    assert repeat.headers["idempotent-body-omitted"] == "true"
    assert repeat.headers["content-length"] == "0"
    assert repeat.content == b""
    assert (await calls(client, upstream, name))["calls"] == 1


async def test_hop_by_hop_headers_go_and_x_forwarded_headers_come(
    proxy: str, upstream: str, client: httpx.AsyncClient
) -> None:
    headers = {
        "Connection": "keep-alive, X-Client-Hop",
        "X-Client-Hop": "must not pass",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-End-To-End": "kept",
    }
    response = await client.post(f"{proxy}/echo", params={"id": new_id()}, content=b"hello", headers=headers)
    seen: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        seen.setdefault(name, []).append(value)
    assert not {"x-client-hop", "keep-alive", "te"} & seen.keys()
    assert "close" not in seen.get("connection", [""])[0]  # the proxy's own connection header, if any
    assert seen["x-end-to-end"] == ["kept"]
    assert seen["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == [proxy.removeprefix("http://")]
    assert seen["host"] == [upstream.removeprefix("http://")]
    assert response.json()["body_size"] == 5


async def test_duplicate_set_cookie_headers_are_kept_and_replayed(
    proxy: str, upstream: str, client: httpx.AsyncClient
) -> None:
    headers = keyed()
    name = new_id()
    first = await client.post(f"{proxy}/cookies", params={"id": name}, content=MESSAGE, headers=headers)
    repeat = await client.post(f"{proxy}/cookies", params={"id": name}, content=MESSAGE, headers=headers)
    for response in (first, repeat):
        assert response.headers.get_list("set-cookie") == ["session=abc; Path=/; HttpOnly", "theme=dark; Path=/"]
        assert "keep-alive" not in response.headers
        assert "x-upstream-hop" not in response.headers
    assert repeat.headers["idempotent-replayed"] == "true"
    assert (await calls(client, upstream, name))["calls"] == 1


async def test_an_upstream_timeout_is_504_and_final(proxy: str, upstream: str, client: httpx.AsyncClient) -> None:
    name, headers = new_id(), keyed()
    params = {"id": name, "seconds": "2"}
    started = time.monotonic()
    first = await client.post(f"{proxy}/work", params=params, content=MESSAGE, headers=headers)
    assert first.status_code == 504
    assert time.monotonic() - started < 1.9  # --upstream-timeout 1, not the upstream's 2 s
    assert first.headers["content-type"] == PROBLEM
    assert first.json()["type"].endswith("/upstream-timeout")

    repeat = await client.post(f"{proxy}/work", params=params, content=MESSAGE, headers=headers)
    assert repeat.status_code == 504
    assert repeat.headers["idempotent-replayed"] == "true"
    assert (await calls(client, upstream, name))["started"] == 1


async def test_an_unkeyed_body_larger_than_max_request_bytes_streams_through(
    proxy: str, client: httpx.AsyncClient
) -> None:
    body = os.urandom(3 * 1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    response = await client.post(f"{proxy}/echo", params={"id": new_id()}, content=chunks())
    assert response.status_code == 200
    assert response.json()["body_size"] == len(body)
    assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


# --- proxies of their own --------------------------------------------------------------------------


@pytest.mark.slow
async def test_upstream_down_is_502_and_the_key_works_once_it_is_back(client: httpx.AsyncClient) -> None:
    upstream_port, proxy_port = free_port(), free_port()
    upstream, proxy = f"http://127.0.0.1:{upstream_port}", f"http://127.0.0.1:{proxy_port}"
    name, headers = new_id(), keyed()
    with serve(proxy_args(upstream, proxy_port), ready_url=f"{proxy}/_relay/healthz"):
        down = await client.post(f"{proxy}/work", params={"id": name}, content=MESSAGE, headers=headers)
        assert down.status_code == 502
        assert down.headers["content-type"] == PROBLEM
        assert down.json()["type"].endswith("/upstream-unreachable")
        with serve(upstream_args(upstream_port), ready_url=f"{upstream}/calls"):
            back = await client.post(f"{proxy}/work", params={"id": name}, content=MESSAGE, headers=headers)
            again = await client.post(f"{proxy}/work", params={"id": name}, content=MESSAGE, headers=headers)
            assert (await calls(client, upstream, name))["calls"] == 1
    assert back.status_code == 200
    assert "idempotent-replayed" not in back.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == back.content


def relay_idem(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay_idem", *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_lets_the_in_flight_request_finish_and_store_its_record(
    upstream: str, redis_url: str, prefix: str, client: httpx.AsyncClient, workers: str
) -> None:
    port = free_port()
    proxy = f"http://127.0.0.1:{port}"
    name, key = new_id(), f"sigterm-{new_id()}"
    # With --workers 2 the signal goes to the parent, which passes it on to the worker serving the request.
    options = ("--redis", redis_url, "--prefix", prefix, "--workers", workers)
    with serve(proxy_args(upstream, port, *options), ready_url=f"{proxy}/_relay/healthz") as process:
        request = asyncio.create_task(
            client.post(f"{proxy}/work", params={"id": name, "seconds": "1.5"}, content=MESSAGE, headers=keyed(key))
        )
        deadline = time.monotonic() + 10
        while (await calls(client, upstream, name))["started"] == 0:
            assert time.monotonic() < deadline, "the request never reached the upstream"
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        response = await request
        assert await asyncio.to_thread(process.wait, 15) == 0
    assert response.status_code == 200
    inspected = relay_idem("inspect", key, "--redis", redis_url, "--prefix", prefix)
    assert inspected.returncode == 0, inspected.stderr
    assert "completed" in inspected.stdout
    assert "200" in inspected.stdout


async def both_workers(client: httpx.AsyncClient, proxy: str, timeout: float = 15.0) -> None:
    """Fresh connections until two different worker processes have answered /_relay/healthz."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(pids) < 2:
        assert time.monotonic() < deadline, f"only workers {pids} answered"
        async with httpx.AsyncClient() as fresh:
            pids.add((await fresh.get(f"{proxy}/_relay/healthz")).json()["pid"])
        await asyncio.sleep(0.02)


def metrics_dirs(directory: Path) -> list[Path]:
    return list(directory.glob("relay-idem-metrics-*"))


def metric(text: str, outcome: str) -> float:
    line = next(
        line for line in text.splitlines() if line.startswith(f'relay_idem_requests_total{{outcome="{outcome}"')
    )
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.slow
async def test_exactly_once_with_two_workers_on_redis(
    upstream: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    proxy = f"http://127.0.0.1:{port}"
    options = ("--workers", "2", "--redis", redis_url, "--prefix", prefix, "--on-conflict", "wait")
    name, headers = new_id(), keyed()
    limits = httpx.Limits(max_connections=100)
    with serve(
        proxy_args(upstream, port, *options), ready_url=f"{proxy}/_relay/healthz", env={"TMPDIR": str(tmp_path)}
    ):
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            await both_workers(client, proxy)

            async def send() -> httpx.Response:
                params = {"id": name, "seconds": "0.5"}
                return await client.post(f"{proxy}/work", params=params, content=MESSAGE, headers=headers)

            responses = await asyncio.gather(*(send() for _ in range(100)))
            assert (await calls(client, upstream, name))["calls"] == 1
            metrics = (await client.get(f"{proxy}/_relay/metrics")).text
        assert metrics_dirs(tmp_path)
    assert {response.status_code for response in responses} == {200}
    assert len({response.content for response in responses}) == 1
    assert sum(response.headers.get("idempotent-replayed") == "true" for response in responses) == 99
    # Summed over both workers (prometheus multiprocess mode).
    assert metric(metrics, "executed") == 1
    assert metric(metrics, "replayed") == 99
    assert metrics_dirs(tmp_path) == []  # the metrics directory went with the proxy


def start_redis(port: int) -> subprocess.Popen[bytes]:
    """A throwaway redis-server on ``port`` that the test may kill: never the shared one."""
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, check=False).stdout != b"PONG\n":
        if process.poll() is not None or time.monotonic() > deadline:
            stop_redis(process)
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)
    return process


def stop_redis(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()


@pytest.mark.slow
async def test_readyz_reflects_a_redis_outage_within_3_seconds(upstream: str, client: httpx.AsyncClient) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port, redis_port = free_port(), free_port()
    proxy = f"http://127.0.0.1:{port}"

    async def ready_within(status: int, seconds: float) -> float:
        started = time.monotonic()
        while (await client.get(f"{proxy}/_relay/readyz")).status_code != status:
            assert time.monotonic() - started < seconds, f"/_relay/readyz not {status} within {seconds} s"
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis_process = start_redis(redis_port)
    try:
        with serve(proxy_args(upstream, port, "--redis", redis_url), ready_url=f"{proxy}/_relay/healthz"):
            await ready_within(200, 5)
            stop_redis(redis_process)
            assert await ready_within(503, 3) < 3
            response = await client.get(f"{proxy}/_relay/readyz")
            assert response.headers["content-type"] == PROBLEM
            redis_process = start_redis(redis_port)
            await ready_within(200, 10)
    finally:
        stop_redis(redis_process)
