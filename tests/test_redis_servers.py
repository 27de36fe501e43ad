"""The topology helpers start real servers that answer, and leave nothing behind."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.retry import Retry

from tests.redis_servers import (
    DelayProxy,
    RedisServer,
    RedisServerError,
    paused,
    start_cluster,
    start_sentinel,
    start_standalone,
)

NO_RETRY = Retry(NoBackoff(), 0)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_gone(server: RedisServer, pid: int) -> None:
    assert not server.running
    assert not pid_alive(pid)
    assert not port_open(server.port)


@pytest.fixture
def standalone() -> Iterator[RedisServer]:
    with start_standalone() as server:
        yield server


def test_standalone_answers_and_is_torn_down() -> None:
    server = start_standalone()
    assert server.process is not None
    pid, directory = server.process.pid, server.dir
    with redis.Redis.from_url(server.url) as client:
        assert client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
    server.stop()
    assert_gone(server, pid)
    assert not directory.exists()
    server.stop()  # idempotent


def test_kill_and_restart_keep_the_port(standalone: RedisServer) -> None:
    port = standalone.port
    with redis.Redis(port=port, socket_timeout=1, retry=NO_RETRY) as client:
        client.set("k", "v")
        standalone.kill()
        assert not port_open(port)
        with pytest.raises(redis.ConnectionError):
            client.get("k")
        standalone.restart()
        assert standalone.port == port
        assert client.get("k") is None  # nothing is persisted
        standalone.restart()  # also from a running server
        assert client.ping()


def test_pause_makes_commands_time_out(standalone: RedisServer) -> None:
    with redis.Redis(port=standalone.port, socket_timeout=0.3, retry=NO_RETRY) as client:
        client.ping()
        with paused(standalone):
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                client.ping()
            assert time.monotonic() - started < 2
        client.connection_pool.disconnect()
        assert client.ping()


def test_stop_while_paused() -> None:
    server = start_standalone()
    assert server.process is not None
    pid = server.process.pid
    server.pause()
    server.stop()
    assert_gone(server, pid)


def test_taken_port_is_a_clear_error(standalone: RedisServer, tmp_path: os.PathLike[str]) -> None:
    clash = RedisServer(standalone.port, tmp_path / "clash")  # type: ignore[operator]
    with pytest.raises(RedisServerError, match="exited"):
        clash.start(timeout=5)
    assert not clash.running


def test_delay_proxy_delays_replies(standalone: RedisServer) -> None:
    with DelayProxy(standalone.port, 0.2) as proxy, redis.Redis.from_url(proxy.url) as client:
        started = time.monotonic()
        assert client.ping()
        assert time.monotonic() - started >= 0.2
        proxy.delay_s = 0.0
        started = time.monotonic()
        for _ in range(10):
            client.ping()
        assert time.monotonic() - started < 0.5
        proxy.drop_connections()
        assert client.ping()  # redis-py reconnects
    assert not port_open(proxy.port)


@pytest.mark.anyio
async def test_delay_proxy_trips_an_async_socket_timeout(standalone: RedisServer) -> None:
    with DelayProxy(standalone.port, 0.5) as proxy:
        client = redis.asyncio.Redis.from_url(proxy.url, socket_timeout=0.1, retry=AsyncRetry(NoBackoff(), 0))
        try:
            with pytest.raises(redis.TimeoutError):
                await client.ping()
            proxy.delay_s = 0.0
            assert await client.ping()
        finally:
            await client.aclose()


@pytest.mark.slow
def test_cluster_spreads_keys_and_is_torn_down() -> None:
    cluster = start_cluster(primaries=3)
    pids = [node.process.pid for node in cluster.nodes if node.process]
    try:
        assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster.ports)
        for node in cluster.nodes:
            assert b"cluster_state:ok" in node.execute("CLUSTER", "INFO")
        client = SyncRedisCluster(host="127.0.0.1", port=cluster.ports[0])
        try:
            for index in range(100):
                client.set(f"relay-idem:{index}", index)
            assert client.get("relay-idem:42") == b"42"
        finally:
            client.close()
        sizes = [node.execute("DBSIZE") for node in cluster.nodes]
        assert sum(sizes) == 100
        assert all(size > 0 for size in sizes)
        assert cluster.node_for_key("relay-idem:42").execute("GET", "relay-idem:42") == b"42"
    finally:
        cluster.stop()
    for node, pid in zip(cluster.nodes, pids, strict=True):
        assert_gone(node, pid)
    assert not cluster.dir.exists()


@pytest.mark.slow
def test_cluster_replica_takes_over_a_killed_primary() -> None:
    with start_cluster(primaries=3, replicas=1) as cluster:
        assert len(cluster.nodes) == 6
        assert len(cluster.primaries) == 3
        assert len(cluster.replicas) == 3
        victim = cluster.node_for_key("relay-idem:1")
        victim.execute("SET", "relay-idem:1", "v")
        victim.execute("WAIT", 1, 1000)
        victim.kill()
        cluster.wait_failed_over(victim)
        assert len(cluster.primaries) == 3
        successor = cluster.node_for_key("relay-idem:1")
        assert successor is not victim
        assert successor.execute("GET", "relay-idem:1") == b"v"


@pytest.mark.slow
@pytest.mark.anyio
async def test_sentinel_failover_moves_the_primary() -> None:
    topology = start_sentinel()
    pids = [server.process.pid for server in [*topology.servers, *topology.sentinels] if server.process]
    try:
        assert topology.url.startswith("redis+sentinel://127.0.0.1:")
        assert topology.url.endswith("/relay")
        old = topology.primary
        sentinel = Sentinel([("127.0.0.1", port) for port in topology.sentinel_ports], socket_timeout=0.5)  # type: ignore[no-untyped-call]
        primary = sentinel.master_for("relay", socket_timeout=0.5)
        try:
            await primary.set("before", "1")
            assert await primary.wait(1, 1000) == 1
            new = topology.failover(settle=True)
            assert new.port != old.port
            assert topology.primary_port() == new.port
            assert all(topology.primary_port(s) == new.port for s in topology.sentinels)
            assert new.execute("GET", "before") == b"1"
            assert old.execute("ROLE")[0] == b"slave"
            # redis-py finds the new primary by itself within a few attempts
            deadline = time.monotonic() + 5
            while True:
                try:
                    await primary.set("after", "1")
                    break
                except (redis.ConnectionError, redis.ReadOnlyError):
                    if time.monotonic() > deadline:
                        raise
            assert new.execute("GET", "after") == b"1"
            # a crash: Sentinel fails over by itself; the dead node comes back as a replica
            new.kill()
            survivor = topology.wait_primary_changed(new.port)
            assert survivor.port == old.port
            topology.rejoin(new)
            assert new.execute("ROLE")[0] == b"slave"
        finally:
            await primary.aclose()
            for managed in sentinel.sentinels:
                await managed.aclose()
    finally:
        topology.stop()
    for server, pid in zip([*topology.servers, *topology.sentinels], pids, strict=True):
        assert_gone(server, pid)
