"""A proxy process that dies, freezes or loses its client while it holds a claim (SPEC §3.8, §3.6).

Two proxies share one Redis with ``--lock-ttl 1``: ``survivor`` serves the whole module, and a
test that kills or stops a proxy starts its own ``victim``. The upstream counts executions in its
own process, so "ran once" is counted outside the proxies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.proxy_upstream import STREAM_FIRST, STREAM_REST
from tests.relay_processes import MESSAGE, calls, keyed, metric, new_id, running_proxy, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

LOCK_TTL = 1.0
WHOLE_STREAM = STREAM_FIRST + b"".join(STREAM_REST)


@pytest.fixture(scope="module")
def options(redis_url: str) -> tuple[str, ...]:
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    return ("--redis", redis_url, "--prefix", prefix, "--lock-ttl", str(LOCK_TTL))


@pytest.fixture(scope="module")
def survivor(upstream: str, options: tuple[str, ...]) -> Iterator[str]:
    with running_proxy(upstream, *options) as (url, _process):
        yield url


async def post(client: httpx.AsyncClient, proxy: str, path: str, params: dict[str, str], key: str) -> httpx.Response:
    return await client.post(f"{proxy}{path}", params=params, content=MESSAGE, headers=keyed(key))


async def until_not_409(client: httpx.AsyncClient, proxy: str, path: str, params: dict[str, str], key: str) -> float:
    """Repeat the request until it is no longer "in progress"; return how long that took."""
    began = time.monotonic()

    async def decided() -> bool:
        return (await post(client, proxy, path, params, key)).status_code != 409

    await wait_for(decided, timeout=LOCK_TTL + 5, interval=0.05, what="the key to be decided")
    return time.monotonic() - began


async def test_a_worker_killed_while_holding_a_claim_frees_the_key_after_lock_ttl(
    upstream: str, survivor: str, options: tuple[str, ...], client: httpx.AsyncClient
) -> None:
    name, key = new_id(), new_id()
    params = {"id": name}
    with running_proxy(upstream, *options) as (victim, process):
        # /stream sends its first chunk, then holds the rest until /release: the claim is held meanwhile.
        async with client.stream("POST", f"{victim}/stream", params=params, content=MESSAGE, headers=keyed(key)) as r:
            assert await asyncio.wait_for(anext(r.aiter_raw()), 5) == STREAM_FIRST
            os.killpg(process.pid, signal.SIGKILL)
            killed = time.monotonic()
            process.wait(5)
    held = await post(client, survivor, "/stream", params, key)
    assert held.status_code == 409  # the dead worker's lease has not run out yet
    await client.get(f"{upstream}/release", params=params)  # the retry will stream at once

    retry = None

    async def retried() -> bool:
        nonlocal retry
        retry = await post(client, survivor, "/stream", params, key)
        return retry.status_code != 409

    await wait_for(retried, timeout=LOCK_TTL + 3, interval=0.05, what="the key to be free")
    freed_after = time.monotonic() - killed
    assert retry is not None
    assert retry.status_code == 200
    assert "idempotent-replayed" not in retry.headers
    assert retry.content == WHOLE_STREAM
    assert freed_after < LOCK_TTL + 1.0  # the lease was last renewed before the kill; room for a loaded machine
    assert (await calls(client, upstream, name))["calls"] == 2  # the killed run, and the retry
    print(f"\nSIGKILL: the key was free again {freed_after:.2f} s after the kill (lock_ttl {LOCK_TTL} s)")


async def test_a_worker_stopped_past_lock_ttl_cannot_overwrite_the_new_owner(
    upstream: str, survivor: str, options: tuple[str, ...], client: httpx.AsyncClient
) -> None:
    name, key = new_id(), new_id()
    params = {"id": name, "seconds": "1"}
    with running_proxy(upstream, *options) as (victim, process):
        late = asyncio.create_task(post(client, victim, "/work", params, key))

        async def first_started() -> bool:
            return (await calls(client, upstream, name))["started"] == 1

        await wait_for(first_started, timeout=5, what="the first run")
        process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(LOCK_TTL + 0.3)  # the lease runs out: nobody renews it
            newer = await post(client, survivor, "/work", params, key)
            assert newer.status_code == 200
            assert "idempotent-replayed" not in newer.headers
        finally:
            process.send_signal(signal.SIGCONT)
        stale = await late  # the stopped worker finishes its request and tries to store it
        metrics = (await client.get(f"{victim}/_relay/metrics")).text
        from_victim = await post(client, victim, "/work", params, key)
    assert stale.status_code == 200
    assert stale.content != newer.content  # two runs, two answers...
    assert metric(metrics, "relay_idem_lease_lost_total") == 1  # ...the late write refused by the token
    replay = await post(client, survivor, "/work", params, key)
    for repeat in (replay, from_victim):
        assert repeat.headers["idempotent-replayed"] == "true"
        assert repeat.content == newer.content  # the new owner's record stands
    assert (await calls(client, upstream, name))["calls"] == 2


async def test_a_client_gone_mid_response_gets_the_replay_on_retry_and_the_app_ran_once(
    upstream: str, survivor: str, client: httpx.AsyncClient
) -> None:
    name, key = new_id(), new_id()
    port = int(survivor.rsplit(":", 1)[1])
    request = (
        f"POST /stream?id={name} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nIdempotency-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(MESSAGE)}\r\n\r\n"
    ).encode() + MESSAGE

    def send_and_leave() -> bytes:
        """Send the request, read until the first chunk of the body arrives, then close the socket."""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request)
            received = b""
            deadline = time.monotonic() + 5
            while STREAM_FIRST not in received:
                assert time.monotonic() < deadline, received
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
            return received

    head = await asyncio.to_thread(send_and_leave)
    assert head.startswith(b"HTTP/1.1 200")
    await client.get(f"{upstream}/release", params={"id": name})  # the rest goes to nobody
    await until_not_409(client, survivor, "/stream", {"id": name}, key)
    retry = await post(client, survivor, "/stream", {"id": name}, key)
    assert retry.status_code == 200
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == WHOLE_STREAM
    assert (await calls(client, upstream, name))["calls"] == 1


async def test_the_lease_is_renewed_while_the_app_runs_3_times_lock_ttl(
    upstream: str, survivor: str, client: httpx.AsyncClient
) -> None:
    name, key = new_id(), new_id()
    params = {"id": name, "seconds": str(3 * LOCK_TTL)}
    first = asyncio.create_task(post(client, survivor, "/work", params, key))
    duplicates = []
    while not first.done():
        await asyncio.sleep(0.25)
        if not first.done():
            duplicates.append(await post(client, survivor, "/work", params, key))
    response = await first
    assert response.status_code == 200
    assert len(duplicates) >= 5
    assert {duplicate.status_code for duplicate in duplicates} == {409}
    assert all(int(duplicate.headers["retry-after"]) >= 1 for duplicate in duplicates)
    replay = await post(client, survivor, "/work", params, key)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == response.content
    assert (await calls(client, upstream, name))["started"] == 1
