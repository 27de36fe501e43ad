"""RedisStore's Lua scripts on a real Redis: reload after NOSCRIPT, one key each, and round trips.

Round trips are counted as Redis ``MONITOR`` shows them (SPEC §7): the commands a client sends.
Commands a script runs show up as ``[db lua]`` and do not count.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from types import TracebackType
from typing import Any

import msgpack
import pytest
import redis
from redis.asyncio import BlockingConnectionPool, Redis

from relay_idem import IdempotencyMiddleware, RedisStore
from relay_idem.exceptions import StoreUnavailable
from relay_idem.keys import record_key
from relay_idem.scopes import ANONYMOUS_SCOPE
from relay_idem.store import Record, StoredResponse, notifier
from relay_idem.store.redis_store import DEFAULT_MAX_CONNECTIONS, DEFAULT_POOL_TIMEOUT
from tests.apps import Counter, Slow, Statuses, call, idem
from tests.redis_servers import start_standalone

pytestmark = pytest.mark.anyio

SCRIPTS = ("begin.lua", "complete.lua", "extend.lua", "release.lua")
LINE = re.compile(rb"^(?P<time>[\d.]+) \[(?P<db>\d+) (?P<client>[^\]]*)\] (?P<args>.*)$")
ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Command:
    client: bytes
    args: tuple[bytes, ...]

    @property
    def name(self) -> str:
        return self.args[0].decode().upper()

    @property
    def from_script(self) -> bool:
        return self.client == b"lua"


class Monitor:
    """Redis ``MONITOR`` on its own connection, read by a thread until an end marker goes by."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.commands: list[Command] = []
        self.marker = f"relay-idem-monitor-{uuid.uuid4().hex}"
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.read, daemon=True)

    def __enter__(self) -> Monitor:
        self.monitor = self.client.monitor()
        self.monitor.__enter__()
        self.thread.start()
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.monitor.__exit__()
        self.client.close()

    def read(self) -> None:
        end = (b"ECHO", f"{self.marker}-end".encode())
        try:
            while True:
                raw = self.monitor.connection.read_response()
                line = raw if isinstance(raw, bytes) else str(raw).encode()
                match = LINE.match(line)
                assert match is not None, line
                command = Command(match["client"], tuple(ARG.findall(match["args"])))
                self.commands.append(command)
                if (command.args[0].upper(), *command.args[1:]) == end:
                    return
        except BaseException as exc:
            self.error = exc

    async def sent(self, client: Any, prefix: str, action: Callable[[], Awaitable[object]]) -> list[Command]:
        """The commands the store sent while ``action`` ran (not those run by scripts).

        A store may use several connections (a redis-py pool, a multiplexed connection for scripts):
        every connection that named a key under ``prefix`` counts, and ``client``'s, which sends the markers.
        """
        await client.echo(f"{self.marker}-start")
        await action()
        await client.echo(f"{self.marker}-end")
        await asyncio.to_thread(self.thread.join, 5)
        assert self.error is None, self.error
        names = [command.args[1:2] for command in self.commands]
        start = names.index((f"{self.marker}-start".encode(),))
        end = names.index((f"{self.marker}-end".encode(),))
        during = [command for command in self.commands[start + 1 : end] if not command.from_script]
        # The store's connections: the one the markers went over, and any that named our keys.
        connections = {self.commands[start].client} | {
            command.client for command in during if any(prefix.encode() in arg for arg in command.args)
        }
        return [
            command
            for command in during
            if command.client in connections and command.name not in ("SUBSCRIBE", "UNSUBSCRIBE")
        ]

    def script_commands(self) -> list[Command]:
        return [command for command in self.commands if command.from_script]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A redis-server of this module's own, in place of the suite's shared one.

    ``MONITOR`` shows every client of a server and ``SCRIPT FLUSH`` empties the script cache of
    all of them, so on a shared Redis another user's commands showed up in these counts (a
    fresh-clone CI run on 2026-11-30 failed on a neighbour's key in MONITOR's output).
    """
    if shutil.which("redis-server") is None:
        if os.environ.get("RELAY_IDEM_REQUIRE_REDIS") == "1":
            pytest.fail("RELAY_IDEM_REQUIRE_REDIS=1 but redis-server is not installed")
        pytest.skip("redis-server is not installed")
    with start_standalone() as server:
        yield server.url


@pytest.fixture
async def redis_store(redis_url: str, prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_url, prefix=prefix)
    await store.ping()
    yield store
    keys = [key async for key in store.redis.scan_iter(match=f"{prefix}:*", count=10_000)]
    if keys:
        await store.redis.delete(*keys)
    await store.close()


def store_key(store: RedisStore, key: str) -> str:
    return record_key(store.prefix, ANONYMOUS_SCOPE, key)


def response() -> StoredResponse:
    return StoredResponse(200, ((b"content-type", b"text/plain"),), b"done")


async def warm_up(store: RedisStore, middleware: IdempotencyMiddleware) -> None:
    """Open the pooled connection and load the scripts, so that only steady-state commands are counted."""
    result = await call(middleware, headers=idem(f"warm-up-{uuid.uuid4().hex}"))
    assert result.status == 200


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_lua_script_touches_only_keys_1(script: str) -> None:
    source = (files("relay_idem.store") / "lua" / script).read_text()
    assert set(re.findall(r"KEYS\[(\d+)\]", source)) == {"1"}
    assert "KEYS[" in source
    # No key name is built inside a script: every key it touches is passed in KEYS.
    assert "..'" not in source.replace(" ", "")


async def test_noscript_after_script_flush_reloads_every_script(redis_store: RedisStore, redis_url: str) -> None:
    store = redis_store
    key, other = store_key(store, "a"), store_key(store, "b")
    await store.redis.script_flush()
    with Monitor(redis_url) as monitor:
        sent = await monitor.sent(store.redis, store.prefix, lambda: store.begin(key, b"f", 10))
    assert [command.name for command in sent] == ["EVALSHA", "SCRIPT", "EVALSHA"]
    claim = await store.begin(key, b"f", 10)  # the script is loaded again: in progress, not a new claim
    assert not claim.acquired
    token = (await store.redis.hget(key, "t")).decode()  # type: ignore[misc]
    await store.redis.script_flush()
    assert await store.renew(key, token, 10) is True
    await store.redis.script_flush()
    assert await store.complete(key, token, Record(b"f", 1.0, response()), 60) is True
    other_claim = await store.begin(other, b"f", 10)
    assert other_claim.token is not None
    await store.redis.script_flush()
    assert await store.release(other, other_claim.token) is True


async def test_every_script_call_names_one_key_and_touches_only_it(redis_store: RedisStore, redis_url: str) -> None:
    store = redis_store
    key, other = store_key(store, "a"), store_key(store, "b")

    async def every_script(key: str, other: str) -> None:
        claim = await store.begin(key, b"f", 10)
        assert claim.token is not None
        await store.begin(key, b"f", 10)
        await store.renew(key, claim.token, 10)
        await store.complete(key, claim.token, Record(b"f", 1.0, response()), 60)
        other_claim = await store.begin(other, b"f", 10)
        assert other_claim.token is not None
        await store.release(other, other_claim.token)

    await every_script(store_key(store, "load-a"), store_key(store, "load-b"))
    with Monitor(redis_url) as monitor:
        sent = await monitor.sent(store.redis, store.prefix, lambda: every_script(key, other))
    evalshas = [command for command in sent if command.name == "EVALSHA"]
    assert len(evalshas) == 6
    for command in evalshas:
        assert command.args[2] == b"1"  # numkeys
        assert command.args[3] in (key.encode(), other.encode())
    inside = monitor.script_commands()
    assert {command.name for command in inside} >= {"HMGET", "HSET", "PEXPIRE", "HGET", "DEL", "PUBLISH"}
    for command in inside:
        if command.name == "PUBLISH":
            assert command.args[1] == store.channel.encode()
        else:
            assert command.args[1] in (key.encode(), other.encode())


async def test_round_trips_first_execution_2_replay_1_no_key_0(redis_store: RedisStore, redis_url: str) -> None:
    store = redis_store
    app = Counter()
    middleware = IdempotencyMiddleware(app, store=store)
    await warm_up(store, middleware)
    results = []

    async def request(*headers: tuple[bytes, bytes]) -> None:
        results.append(await call(middleware, headers=headers))

    with Monitor(redis_url) as monitor:
        first = await monitor.sent(store.redis, store.prefix, lambda: request(*idem("k")))
    with Monitor(redis_url) as monitor:
        replay = await monitor.sent(store.redis, store.prefix, lambda: request(*idem("k")))
    with Monitor(redis_url) as monitor:
        no_key = await monitor.sent(store.redis, store.prefix, lambda: request())
    assert [result.status for result in results] == [200, 200, 200]
    assert results[1].header(b"idempotent-replayed") == b"true"
    assert app.calls == 3  # warm-up, first execution, request without a key
    assert [command.name for command in first] == ["EVALSHA", "EVALSHA"]
    assert [command.name for command in replay] == ["EVALSHA"]
    assert no_key == []


async def test_round_trips_conflict_1_released_outcome_2(redis_store: RedisStore, redis_url: str) -> None:
    store = redis_store
    gate = asyncio.Event()
    slow = Slow(gate)
    middleware = IdempotencyMiddleware(slow, store=store)
    await warm_up(store, IdempotencyMiddleware(Counter(), store=store))
    first = asyncio.create_task(call(middleware, headers=idem("busy")))
    await slow.started.wait()
    with Monitor(redis_url) as monitor:
        conflict = await monitor.sent(store.redis, store.prefix, lambda: call(middleware, headers=idem("busy")))
    gate.set()
    assert (await first).status == 200
    released_app = IdempotencyMiddleware(Statuses(503), store=store)
    with Monitor(redis_url) as monitor:
        released = await monitor.sent(store.redis, store.prefix, lambda: call(released_app, headers=idem("503")))
    assert [command.name for command in conflict] == ["EVALSHA"]
    assert [command.name for command in released] == ["EVALSHA", "EVALSHA"]


WAIT_TIMEOUT = 2.0


async def test_waiting_repeat_looks_again_at_most_twice_a_second(redis_store: RedisStore, redis_url: str) -> None:
    # README ("Waiting repeats"): one claim on arrival, then a look every POLL_INTERVAL (0.5 s: 2 store
    # commands a second) while nothing is published, and one more as wait_timeout ends. SPEC 6a allows 4.
    store = redis_store
    gate = asyncio.Event()
    slow = Slow(gate)
    middleware = IdempotencyMiddleware(slow, store=store, on_conflict="wait", wait_timeout=WAIT_TIMEOUT)
    await warm_up(store, IdempotencyMiddleware(Counter(), store=store))
    first = asyncio.create_task(call(middleware, headers=idem("held")))
    await slow.started.wait()
    results = []

    async def waiter() -> None:
        results.append(await call(middleware, headers=idem("held")))

    with Monitor(redis_url) as monitor:
        started = time.monotonic()
        sent = await monitor.sent(store.redis, store.prefix, waiter)
        elapsed = time.monotonic() - started
    gate.set()
    await first
    assert results[0].status == 409
    assert elapsed >= WAIT_TIMEOUT
    assert {command.name for command in sent} == {"EVALSHA"}
    assert notifier.POLL_INTERVAL == 0.5
    assert 2 <= len(sent) <= 2 + WAIT_TIMEOUT / notifier.POLL_INTERVAL  # it did look again, at most every 0.5 s


async def test_the_pool_blocks_at_64_connections_and_waits_up_to_2_s(redis_store: RedisStore) -> None:
    # README ("How it talks to Redis"): a burst past the pool waits for a connection instead of failing.
    pool = redis_store.redis.connection_pool
    assert isinstance(pool, BlockingConnectionPool)
    held = [await pool.get_connection() for _ in range(DEFAULT_MAX_CONNECTIONS)]
    try:
        waiting = asyncio.create_task(pool.get_connection())
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the 65th waits ...
        await pool.release(held.pop())
        held.append(await asyncio.wait_for(waiting, 10.0))  # ... and gets the connection given back
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError):  # nobody gives one back: it gives up
            await asyncio.wait_for(pool.get_connection(), 10.0)
        assert time.monotonic() - started >= DEFAULT_POOL_TIMEOUT
    finally:
        for connection in held:
            await pool.release(connection)


async def test_record_is_one_hash_with_owner_token_and_msgpack_record(redis_store: RedisStore) -> None:
    store = redis_store
    key = store_key(store, "layout")
    claim = await store.begin(key, b"fp", 0.25)
    assert claim.token is not None
    raw: Any = store.redis
    assert await raw.type(key) == b"hash"
    fields = await raw.hgetall(key)
    assert fields[b"t"] == claim.token.encode()
    assert msgpack.unpackb(fields[b"d"])[0] == b"fp"
    assert 0 < await raw.pttl(key) <= 250
    assert await store.complete(key, claim.token, Record(b"fp", 1.0, response()), 30)
    fields = await raw.hgetall(key)
    assert set(fields) == {b"d"}
    assert msgpack.unpackb(fields[b"d"])[2] == 200
    assert 29_000 < await raw.pttl(key) <= 30_000


async def test_completion_and_release_are_published_on_the_done_channel(redis_store: RedisStore) -> None:
    store = redis_store
    key, other = store_key(store, "a"), store_key(store, "b")
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(store.channel)
    try:
        claim = await store.begin(key, b"f", 10)
        other_claim = await store.begin(other, b"f", 10)
        assert claim.token is not None
        assert other_claim.token is not None
        assert await store.complete(key, claim.token, Record(b"f", 1.0, response()), 60)
        assert await store.release(other, other_claim.token)
        assert not await store.release(other, other_claim.token)  # refused: nothing published
        messages = []
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            message = await pubsub.get_message(timeout=0.05)
            if message is not None:
                messages.append(message["data"])
        assert messages == [key.encode(), other.encode()]
    finally:
        await pubsub.aclose()


async def test_store_accepts_a_ready_client(redis_url: str, prefix: str) -> None:
    store = RedisStore(Redis.from_url(redis_url), prefix=prefix)
    try:
        claim = await store.begin(f"{prefix}:k", b"f", 10)
        assert claim.acquired
        assert await store.delete(f"{prefix}:k")
    finally:
        await store.close()


async def test_unreachable_redis_raises_store_unavailable(prefix: str) -> None:
    with socket_on_free_port() as port:
        store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", prefix=prefix)
        try:
            for operation in (
                store.ping,
                lambda: store.begin(f"{prefix}:k", b"f", 10),
                lambda: store.complete(f"{prefix}:k", "t", Record(b"f", 1.0, response()), 60),
                lambda: store.release(f"{prefix}:k", "t"),
                lambda: store.renew(f"{prefix}:k", "t", 10),
                lambda: store.get(f"{prefix}:k"),
                lambda: store.delete(f"{prefix}:k"),
            ):
                with pytest.raises(StoreUnavailable):
                    await operation()
        finally:
            await store.close()


class socket_on_free_port:
    """A port on 127.0.0.1 that nothing listens on while the block runs (bound, never listening)."""

    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        port: int = self.socket.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self.socket.close()
