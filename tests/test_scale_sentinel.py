"""Sentinel for real (SPEC §6, §3.8): a primary, a replica and three sentinels; forced failovers under load.

After ``SENTINEL FAILOVER`` the old primary lives on and accepts writes until Sentinel demotes it
(some 10 s later), and what it accepted is then lost. The store asks Sentinel for the primary
every 0.5 s and moves its connections; with ``--min-replicas 1`` the writes of the failover
window become 503s instead of losses, and ``WAIT`` keeps failing until the old primary is back
as a replica of the new one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from relay_idem import RedisStore
from relay_idem.exceptions import StoreUnavailable
from tests.redis_servers import RedisSentinel, start_sentinel
from tests.relay_processes import MESSAGE, PROBLEM, calls, keyed, new_id, running_proxy, wait_for
from tests.test_functions import run_once_on

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

# The longest the proxy may answer 503 around a forced failover with --min-replicas 1: Sentinel
# demotes the old primary some 10 s after the switch, and WAIT fails until it has synced.
FAILOVER_WINDOW_LIMIT = 30.0


@pytest.fixture(scope="module")
def topology() -> Iterator[RedisSentinel]:
    with start_sentinel() as topology:
        yield topology


def subscribers(topology: RedisSentinel, port: int, channel: str) -> int:
    server = next(server for server in topology.servers if server.port == port)
    count: int = server.execute("PUBSUB", "NUMSUB", channel)[1]
    return count


async def test_an_idempotent_function_runs_once_on_sentinel(topology: RedisSentinel) -> None:
    await run_once_on(topology.url)


async def test_after_a_forced_failover_the_store_writes_to_the_new_primary_within_a_second(
    topology: RedisSentinel,
) -> None:
    store = RedisStore.from_url(topology.url, prefix="follow")
    old = topology.primary
    try:
        await store.begin("follow:before", b"fp", 10)
        await store.wait("follow:nothing", time.monotonic(), 0.5)  # the subscription, on the old primary
        assert subscribers(topology, old.port, store.channel) == 1
        new = await asyncio.to_thread(topology.failover)  # returns once every sentinel names the new primary
        switched = time.monotonic()
        written = 0

        async def lands_on_new_primary() -> bool:
            nonlocal written
            written += 1
            key = f"follow:after-{written}"
            try:
                await store.begin(key, b"fp", 10)
            except StoreUnavailable:
                # A call in flight when the watcher moves the connection fails (a 503 for a
                # client): what the old primary would have accepted is lost anyway.
                return False
            return bool(new.execute("EXISTS", key))

        await wait_for(lands_on_new_primary, timeout=1.5, interval=0.02, what="a claim on the new primary")

        async def subscribed_on_new_primary() -> bool:
            return await asyncio.to_thread(subscribers, topology, new.port, store.channel) == 1

        await wait_for(subscribed_on_new_primary, timeout=1.5, what="the subscription on the new primary")
        assert time.monotonic() - switched < 1.5
        assert subscribers(topology, old.port, store.channel) == 0
    finally:
        await store.close()
        # Sentinel would demote it only ~10 s later; the next test needs a replica again.
        await asyncio.to_thread(topology.rejoin, old)


@dataclass
class Answer:
    key: str
    sent_at: float
    status: int
    body: bytes
    retry_after: str | None
    content_type: str | None


async def test_a_failover_under_load_with_min_replicas_1_is_a_bounded_window_of_503s(
    topology: RedisSentinel, upstream: str, client: httpx.AsyncClient
) -> None:
    options = ("--redis", topology.url, "--min-replicas", "1", "--prefix", "failover")
    with running_proxy(upstream, *options) as (proxy, process):
        answers: list[Answer] = []
        stop = asyncio.Event()

        async def steady_load() -> None:
            while not stop.is_set():
                key = new_id()
                sent_at = time.monotonic()
                params = {"id": key}
                response = await client.post(f"{proxy}/work", params=params, content=MESSAGE, headers=keyed(key))
                answers.append(
                    Answer(
                        key,
                        sent_at,
                        response.status_code,
                        response.content,
                        response.headers.get("retry-after"),
                        response.headers.get("content-type"),
                    )
                )
                await asyncio.sleep(0.02)

        loaders = [asyncio.create_task(steady_load()) for _ in range(3)]
        try:
            await asyncio.sleep(1.5)
            failover_at = time.monotonic()
            await asyncio.to_thread(topology.failover)

            async def served_again() -> bool:
                # Two seconds of nothing but 200s, after at least one 503.
                recent = [a for a in answers if a.sent_at > time.monotonic() - 2.0]
                errors = [a for a in answers if a.status != 200]
                return bool(errors) and bool(recent) and all(a.status == 200 for a in recent)

            await wait_for(served_again, timeout=FAILOVER_WINDOW_LIMIT + 10, interval=0.2, what="200s again")
        finally:
            stop.set()
            await asyncio.gather(*loaders)
        assert process.poll() is None
        assert (await client.get(f"{proxy}/_relay/healthz")).status_code == 200

        assert {answer.status for answer in answers} == {200, 503}
        errors = [answer for answer in answers if answer.status == 503]
        assert all(a.content_type == PROBLEM and a.retry_after is not None for a in errors)
        window = errors[-1].sent_at - errors[0].sent_at
        assert errors[0].sent_at > failover_at - 0.5
        assert window < FAILOVER_WINDOW_LIMIT
        before = [answer for answer in answers if answer.status == 200 and answer.sent_at < failover_at]
        after = [answer for answer in answers if answer.status == 200 and answer.sent_at > errors[-1].sent_at]
        assert len(before) >= 20
        assert len(after) >= 10

        # Every key completed before the failover (and after it) replays, and ran once.
        for answer in before + after:
            params = {"id": answer.key}
            replay = await client.post(f"{proxy}/work", params=params, content=MESSAGE, headers=keyed(answer.key))
            assert replay.status_code == 200, answer
            assert replay.headers.get("idempotent-replayed") == "true", answer
            assert replay.content == answer.body
        counts = await asyncio.gather(*(calls(client, upstream, answer.key) for answer in before + after))
        assert all(count["calls"] == 1 for count in counts)
        print(
            f"\nfailover: {len(before)} before, {len(errors)} x 503 over {window:.1f} s"
            f" (first {errors[0].sent_at - failover_at:+.1f} s after SENTINEL FAILOVER), {len(after)} after"
        )


async def test_sentinels_password_is_a_query_parameter_and_the_user_info_is_the_primarys() -> None:
    """Issue 12: Sentinel's own password could not be given in the URL."""
    with start_sentinel(password="data-secret", sentinel_password="sentinel-secret") as protected:
        nodes = ",".join(f"127.0.0.1:{port}" for port in protected.sentinel_ports)
        base = f"redis+sentinel://:data-secret@{nodes}/{protected.service}"
        store = RedisStore.from_url(f"{base}?sentinel_password=sentinel-secret", prefix="auth")
        try:
            claim = await store.begin("auth:a", b"fp", 10)
            assert claim.token is not None
            assert protected.primary.execute("HEXISTS", "auth:a", "t") == 1
        finally:
            await store.close()
        wrong = [
            base,  # no password for the sentinels
            f"{base}?sentinel_password=nope",
            f"redis+sentinel://:nope@{nodes}/{protected.service}?sentinel_password=sentinel-secret",
        ]
        for url in wrong:
            store = RedisStore.from_url(url, prefix="auth")
            try:
                with pytest.raises(StoreUnavailable):
                    await store.begin("auth:b", b"fp", 10)
            finally:
                await store.close()
