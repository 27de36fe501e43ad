"""Redis Cluster for real (SPEC §6): a 3-primary cluster, the proxy with two workers in front of it.

One cluster, one upstream and one proxy serve the whole module. The first test is the proxy's very
first keyed traffic, so it is also the duplicate storm right after start-up that redis-py 8.1's
RedisCluster race used to turn into 5xx (README, known issues).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from relay_idem import RedisStore
from relay_idem.exceptions import StoreUnavailable
from relay_idem.store.base import Record, StoredResponse
from tests.apps import HANG_GUARD, LONG_WAIT
from tests.redis_servers import RedisCluster, RedisServer, start_cluster, wait_until
from tests.relay_processes import MESSAGE, calls, keyed, new_id, running_proxy
from tests.test_functions import run_once_on

pytestmark = pytest.mark.anyio

PREFIX = "scale-cluster"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with start_cluster(primaries=3) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def proxy(cluster: RedisCluster, upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    options = ("--workers", "2", "--redis", cluster.url, "--prefix", PREFIX, "--on-conflict", "wait")
    env = {"TMPDIR": str(tmp_path_factory.mktemp("metrics"))}
    with running_proxy(upstream, *options, env=env) as (url, _process):
        yield url


def records_per_node(cluster: RedisCluster, prefix: str) -> list[int]:
    return [len(node.execute("KEYS", f"{prefix}:*")) for node in cluster.nodes]


@pytest.mark.slow
async def test_100_concurrent_duplicates_through_two_workers_execute_once(
    proxy: str, upstream: str, client: httpx.AsyncClient
) -> None:
    name, key = new_id(), f"pedido-{new_id()}"
    pids: set[int] = set()
    deadline = time.monotonic() + 15
    while len(pids) < 2:  # both workers up (healthz does not touch the store: it stays cold)
        assert time.monotonic() < deadline, f"only workers {pids} answered"
        async with httpx.AsyncClient() as fresh:
            pids.add((await fresh.get(f"{proxy}/_relay/healthz")).json()["pid"])

    async def send() -> httpx.Response:
        params = {"id": name, "seconds": "0.5"}
        return await client.post(f"{proxy}/work", params=params, content=MESSAGE, headers=keyed(key))

    responses = await asyncio.gather(*(send() for _ in range(100)))
    assert [r.status_code for r in responses] == [200] * 100, {r.status_code: r.text for r in responses}
    assert (await calls(client, upstream, name))["started"] == 1
    assert len({response.content for response in responses}) == 1
    assert sum(response.headers.get("idempotent-replayed") == "true" for response in responses) == 99


@pytest.mark.slow
async def test_50_keys_spread_over_the_nodes_and_all_replay(
    proxy: str, upstream: str, cluster: RedisCluster, client: httpx.AsyncClient
) -> None:
    names = [new_id() for _ in range(50)]
    before = sum(records_per_node(cluster, PREFIX))

    async def send(name: str) -> httpx.Response:
        return await client.post(f"{proxy}/work", params={"id": name}, content=MESSAGE, headers=keyed(name))

    first = await asyncio.gather(*(send(name) for name in names))
    repeat = await asyncio.gather(*(send(name) for name in names))
    assert {response.status_code for response in first + repeat} == {200}
    assert all("idempotent-replayed" not in response.headers for response in first)
    assert all(response.headers["idempotent-replayed"] == "true" for response in repeat)
    assert [response.content for response in repeat] == [response.content for response in first]
    executions = await asyncio.gather(*(calls(client, upstream, name) for name in names))
    assert all(count["calls"] == 1 for count in executions)
    per_node = records_per_node(cluster, PREFIX)
    assert sum(per_node) - before == 50
    assert sum(1 for count in per_node if count) >= 2, per_node


@pytest.mark.slow
async def test_a_cold_store_survives_a_storm_of_claims(cluster: RedisCluster) -> None:
    """Regression: 200 claims on a store nobody used yet gave AttributeError ('NoneType' ... 'writelines')
    or 503s, one storm in a few, before the slot table was loaded first and MOVED stopped closing every
    connection (redis-py 8.1, README known issues)."""
    failures: list[BaseException] = []
    for round_ in range(10):
        store = RedisStore.from_url(cluster.url, prefix=f"storm-{round_}")
        try:
            outcomes = await asyncio.gather(
                *(store.begin(f"storm-{round_}:{n}", b"fp", 10) for n in range(200)), return_exceptions=True
            )
        finally:
            await store.close()
        failures += [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert failures == []


@pytest.mark.slow
async def test_an_idempotent_function_runs_once_on_cluster(cluster: RedisCluster) -> None:
    await run_once_on(cluster.url)


def subscribed_nodes(cluster: RedisCluster, channel: str) -> list[RedisServer]:
    """Nodes where someone subscribes to ``channel`` (PUBSUB NUMSUB is per node in a cluster)."""
    return [node for node in cluster.nodes if node.running and node.execute("PUBSUB", "NUMSUB", channel)[1] > 0]


@pytest.mark.slow
async def test_the_wait_subscription_moves_off_a_dead_node(cluster: RedisCluster, no_polling: None) -> None:
    """redis-py's ClusterPubSub stays on a dead node; the notifier moves to another one, and a waiter is
    woken by a completion again (published by the script on any node, heard on every node): with polling
    out of the way, only the message ends its wait before LONG_WAIT."""
    channel = "moving:done"
    for node in cluster.nodes:  # the surviving nodes keep serving their own slots
        node.execute("CONFIG", "SET", "cluster-require-full-coverage", "no")
    store = RedisStore.from_url(cluster.url, prefix="moving")
    other = RedisStore.from_url(cluster.url, prefix="moving")
    victim: RedisServer | None = None
    try:
        await other.ping()  # learns the slot table while every node is up
        await store.wait("moving:warm-up", time.monotonic(), 0.5)  # starts the subscription
        await asyncio.to_thread(wait_until, lambda: len(subscribed_nodes(cluster, channel)) == 1, 5, "a subscriber")
        victim = subscribed_nodes(cluster, channel)[0]
        victim.kill()
        killed = time.monotonic()
        await asyncio.to_thread(
            wait_until, lambda: len(subscribed_nodes(cluster, channel)) == 1, 5, "a subscriber on another node"
        )
        moved_after = time.monotonic() - killed
        key = next(f"moving:{n}" for n in range(100) if cluster.node_for_key(f"moving:{n}") is not victim)
        claim = await store.begin(key, b"fp", 10)
        assert claim.token is not None
        waiter = asyncio.create_task(store.wait(key, time.monotonic(), LONG_WAIT))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        record = Record(b"fp", time.time(), StoredResponse(200, (), b"done"))
        assert await other.complete(key, claim.token, record, 60)
        await asyncio.wait_for(waiter, HANG_GUARD)  # woken by the message
        print(f"\nthe subscription moved {moved_after:.2f} s after its node was killed")
    finally:
        await store.close()
        await other.close()
        if victim is not None:
            victim.restart()
            cluster.wait_ok()


async def test_a_dead_cluster_is_a_store_error_not_a_crash() -> None:
    store = RedisStore.from_url("redis+cluster://127.0.0.1:1,127.0.0.1:2", prefix="nowhere")
    try:
        with pytest.raises(StoreUnavailable):
            await store.begin("nowhere:1", b"fp", 10)
    finally:
        await store.close()


def test_min_replicas_on_cluster_is_one_clean_cli_error() -> None:
    flags = ["--upstream", "http://127.0.0.1:9", "--min-replicas", "1", "--redis", "redis+cluster://127.0.0.1:7000"]
    result = subprocess.run(
        [sys.executable, "-m", "relay_idem", "proxy", *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: --min-replicas is not supported on Redis Cluster (redis+cluster://): use a standalone or Sentinel URL"
    ]
    with pytest.raises(ValueError, match="not supported on Redis Cluster"):
        RedisStore.from_url("redis+cluster://127.0.0.1:7000", min_replicas=1)
