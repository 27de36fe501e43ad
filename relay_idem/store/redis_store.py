"""RedisStore: records in Redis (standalone, Sentinel or Cluster), one key per record."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisClusterException, RedisError

from relay_idem.exceptions import StoreUnavailable
from relay_idem.store.base import Claim, Record, RecordInfo, owner_token
from relay_idem.store.codec import decode_record, encode_record
from relay_idem.store.multiplexed import Arg, MultiplexedRedis, ResponseError
from relay_idem.store.notifier import Notifier
from relay_idem.store.scripts import (
    LUA_BEGIN,
    LUA_COMPLETE,
    LUA_EXTEND,
    LUA_RELEASE,
    MultiplexedRunner,
    NotReplicated,
    RedisPyRunner,
    Replication,
    ScriptRunner,
)
from relay_idem.store.topology import PrimaryWatcher, is_teardown_race

RedisClient = Redis | RedisCluster
T = TypeVar("T")

DEFAULT_SOCKET_TIMEOUT = 0.5
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_POOL_TIMEOUT = 2.0
# How long a claim or completion waits for ``min_replicas`` acknowledgements (``WAIT``). A healthy
# replica acknowledges within a millisecond or so, so this is only reached when one is down or far
# behind: it is how long a keyed request takes to fail then. It must end before the socket timeout,
# or the WAIT would end as a dropped connection rather than a clean "N of M replicas" error (README).
DEFAULT_MIN_REPLICAS_TIMEOUT = 0.4


def _milliseconds(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def check_min_replicas_timeout(timeout: float, socket_timeout: float) -> None:
    """``ValueError`` unless ``WAIT`` with ``timeout`` can end before the connection's ``socket_timeout``."""
    if not 0 < timeout < socket_timeout:
        raise ValueError(
            f"min_replicas_timeout must be more than 0 and less than the socket timeout ({socket_timeout:g} s), "
            f"not {timeout:g}"
        )


def _host_ports(netloc: str, url: str) -> list[tuple[str, int]]:
    nodes = []
    for node in netloc.rpartition("@")[2].split(","):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port in {url!r}, got {node!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


SENTINEL_QUERY = ("sentinel_username", "sentinel_password")


def _sentinel_credentials(query: str, url: str) -> dict[str, str]:
    """Sentinel's own credentials from ``?sentinel_username=&sentinel_password=`` (the user-info is the data nodes')."""
    fields = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(fields) - set(SENTINEL_QUERY))
    if unknown:
        raise ValueError(
            f"unknown parameter {unknown[0]!r} in {url!r}: a Sentinel URL takes {', '.join(SENTINEL_QUERY)}"
        )
    return {name.removeprefix("sentinel_"): values[-1] for name, values in fields.items()}


@dataclass(frozen=True, slots=True)
class Connections:
    """What ``from_url`` opens: a redis-py client, the multiplexed connection where one fits, and
    for Sentinel the watcher that keeps both on the current primary."""

    client: RedisClient
    multiplexed: MultiplexedRedis | None
    watcher: PrimaryWatcher | None = None


def connect_url(url: str, **options: Any) -> Connections:
    """Clients for any URL form SPEC §1 names.

    ``redis://`` and ``unix://`` get a redis-py client and a multiplexed connection for the hot path;
    ``redis+sentinel://[user:pass@]h:p,h:p/service[/db][?sentinel_password=…]`` the same, both
    following the primary Sentinel names: the user-info authenticates to the primary (and is what
    its replicas take over with), ``sentinel_username``/``sentinel_password`` to the sentinels;
    ``rediss://`` and ``redis+cluster://h:p,h:p`` a redis-py client only.
    """
    options.setdefault("socket_timeout", DEFAULT_SOCKET_TIMEOUT)
    options.setdefault("socket_connect_timeout", DEFAULT_SOCKET_TIMEOUT)
    timeouts = {"timeout": options["socket_timeout"], "connect_timeout": options["socket_connect_timeout"]}
    parts = urlsplit(url)
    credentials: dict[str, Any] = {
        name: unquote(value) for name, value in (("username", parts.username), ("password", parts.password)) if value
    }
    if parts.scheme in ("redis", "rediss", "unix"):
        # Under a burst, wait for a pooled connection rather than fail with "Too many connections".
        options.setdefault("max_connections", DEFAULT_MAX_CONNECTIONS)
        options.setdefault("timeout", DEFAULT_POOL_TIMEOUT)
        pool = BlockingConnectionPool.from_url(url, **options)
        client = Redis.from_pool(pool)
        if parts.scheme == "rediss":
            return Connections(client, None)
        where = pool.connection_kwargs
        multiplexed = MultiplexedRedis(
            where.get("host", "localhost"),
            where.get("port", 6379),
            path=where.get("path"),
            db=where.get("db", 0),
            username=where.get("username"),
            password=where.get("password"),
            **timeouts,
        )
        return Connections(client, multiplexed)
    if parts.scheme == "redis+cluster":
        nodes = [ClusterNode(host, port) for host, port in _host_ports(parts.netloc, url)]
        # Every 5th MOVED, redis-py would close every connection, including those other tasks are
        # still opening (README, known issues); a MOVED updates the slot table either way.
        options.setdefault("reinitialize_steps", 0)
        return Connections(RedisCluster(startup_nodes=nodes, **credentials, **options), None)
    if parts.scheme == "redis+sentinel":
        service, _, db = parts.path.strip("/").partition("/")
        if not service or (db and not db.isdigit()):
            raise ValueError(f"expected redis+sentinel://host:port[,host:port]/service[/db], got {url!r}")
        sentinel_kwargs = {name: value for name, value in options.items() if name.startswith("socket_")}
        sentinel_kwargs |= _sentinel_credentials(parts.query, url)
        sentinel_kwargs |= options.pop("sentinel_kwargs", None) or {}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            _host_ports(parts.netloc, url), sentinel_kwargs=sentinel_kwargs, **options
        )
        primary: Redis = sentinel.master_for(service, db=int(db or 0), **credentials)
        primary_pool = cast(SentinelConnectionPool, primary.connection_pool)

        async def current_primary() -> tuple[str, int]:
            host, port = await primary_pool.get_master_address()  # type: ignore[no-untyped-call]
            return str(host), int(port)

        multiplexed = MultiplexedRedis(address=current_primary, db=int(db or 0), **credentials, **timeouts)
        return Connections(primary, multiplexed, PrimaryWatcher(primary_pool, multiplexed))
    raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} in {url!r}")


def client_from_url(url: str, **options: Any) -> RedisClient:
    """A redis-py client for any URL form :func:`connect_url` takes."""
    return connect_url(url, **options).client


STORE_ERRORS = (RedisError, RedisClusterException, OSError, ResponseError, AttributeError)


def store_unavailable(exc: Exception) -> StoreUnavailable:
    """The store error ``exc`` means; an ``AttributeError`` that is not redis-py's teardown race is re-raised."""
    if isinstance(exc, AttributeError) and not is_teardown_race(exc):
        raise exc
    if isinstance(exc, AttributeError):
        return StoreUnavailable(f"redis-py closed a connection it was opening: {exc}")
    return StoreUnavailable(f"{type(exc).__name__}: {exc}")


class RedisStore:
    """The :class:`~relay_idem.Store` contract on Redis.

    Each record is one hash (``t``: owner token while in progress, ``d``: msgpack record), and each
    operation is one ``EVALSHA`` of a script that touches only that key, so the same scripts run on
    a standalone server, behind Sentinel and on Cluster. Completions and releases are published on
    ``<prefix>:done``; one shared subscription per store wakes every waiting repeat.

    On first use, a Cluster client learns the slot table before any command is sent (redis-py
    would route commands issued meanwhile to a random node: README, known issues), and a
    Sentinel ``watcher`` starts following the primary; :meth:`close` stops it.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "relay-idem",
        min_replicas: int = 0,
        min_replicas_timeout: float = DEFAULT_MIN_REPLICAS_TIMEOUT,
        multiplexed: MultiplexedRedis | None = None,
        watcher: PrimaryWatcher | None = None,
    ) -> None:
        replication = Replication(min_replicas, min_replicas_timeout) if min_replicas else None
        self.redis = redis
        self.prefix = prefix
        self.channel = f"{prefix}:done"
        self.scripts: ScriptRunner = RedisPyRunner(redis, replication)
        if multiplexed is not None:
            replicated = self.scripts if replication is not None else None
            self.scripts = MultiplexedRunner(multiplexed, replicated)
        self.notifier = Notifier(redis, self.channel)
        self.watcher = watcher
        if watcher is not None:
            watcher.followers.append(self.notifier.follow_primary)
        self._ready = not isinstance(redis, RedisCluster) and watcher is None
        self._ready_lock = asyncio.Lock()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "relay-idem",
        min_replicas: int = 0,
        min_replicas_timeout: float = DEFAULT_MIN_REPLICAS_TIMEOUT,
        **options: Any,
    ) -> RedisStore:
        """A store for ``url`` (see :func:`connect_url`); ``options`` go to the redis-py client.

        ``min_replicas=N`` makes every claim and completion wait up to ``min_replicas_timeout``
        seconds for N replicas to acknowledge it (``WAIT``); fewer is a store error. The timeout must
        be shorter than the socket timeout (``socket_timeout``, 0.5 s unless given).
        """
        if min_replicas:
            check_min_replicas_timeout(min_replicas_timeout, options.get("socket_timeout", DEFAULT_SOCKET_TIMEOUT))
        connections = connect_url(url, **options)
        return cls(
            connections.client,
            prefix=prefix,
            min_replicas=min_replicas,
            min_replicas_timeout=min_replicas_timeout,
            multiplexed=connections.multiplexed,
            watcher=connections.watcher,
        )

    async def _get_ready(self) -> None:
        async with self._ready_lock:
            if self._ready:
                return
            if isinstance(self.redis, RedisCluster):
                await self.redis.initialize()
            if self.watcher is not None:
                self.watcher.start()
            self._ready = True

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            if not self._ready:
                await self._get_ready()
            return await operation()
        except STORE_ERRORS as exc:
            raise store_unavailable(exc) from exc

    async def _run(self, script: str, key: str, args: tuple[Arg, ...], *, replicated: bool = False) -> Any:
        """``_call`` for the scripts, without its closure: these run on every keyed request."""
        try:
            if not self._ready:
                await self._get_ready()
            return await self.scripts.run(script, key, args, replicated=replicated)
        except STORE_ERRORS as exc:
            raise store_unavailable(exc) from exc

    async def begin(self, key: str, fingerprint: bytes, lock_ttl: float) -> Claim:
        token = owner_token()
        record = Record(fingerprint, time.time())
        args = (encode_record(record), token, _milliseconds(lock_ttl))
        try:
            existing = await self._run(LUA_BEGIN, key, args, replicated=True)
        except NotReplicated as exc:
            if exc.reply is None:
                # The claim was written but not replicated: a store error before the claim, so
                # release it, or the retry would see "in progress" until the lease ends.
                with contextlib.suppress(StoreUnavailable):
                    await self.release(key, token)
            raise
        if existing is None:
            return Claim(record, token)
        _owner, data = existing
        return Claim(decode_record(data))

    async def complete(self, key: str, token: str, record: Record, ttl: float) -> bool:
        args = (token, encode_record(record), _milliseconds(ttl), self.channel)
        return bool(await self._run(LUA_COMPLETE, key, args, replicated=True))

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._run(LUA_RELEASE, key, (token, self.channel)))

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        args = (token, _milliseconds(lock_ttl))
        return bool(await self._run(LUA_EXTEND, key, args))

    async def wait(self, key: str, since: float, timeout: float) -> None:
        await self.notifier.wait(key, since, timeout)

    async def get(self, key: str) -> RecordInfo | None:
        data: bytes | None = await self._call(lambda: self.redis.hget(key, "d"))  # type: ignore[arg-type,return-value]
        if data is None:
            return None
        ttl_ms = await self._call(lambda: self.redis.pttl(key))
        return RecordInfo(decode_record(data), ttl_ms / 1000 if ttl_ms >= 0 else None)

    async def delete(self, key: str) -> bool:
        return bool(await self._call(lambda: self.redis.delete(key)))

    async def ping(self) -> None:
        await self._call(self.scripts.ping)

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.close()
        await self.notifier.close()
        await self.scripts.close()
        await self.redis.aclose()
