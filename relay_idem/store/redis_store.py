"""RedisStore: records in Redis (standalone, Sentinel or Cluster), one key per record."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import RedisError

from relay_idem.exceptions import StoreUnavailable
from relay_idem.store.base import Claim, Record, RecordInfo
from relay_idem.store.codec import decode_record, encode_record
from relay_idem.store.notifier import Notifier

RedisClient = Redis | RedisCluster
T = TypeVar("T")

DEFAULT_SOCKET_TIMEOUT = 0.5
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_POOL_TIMEOUT = 2.0


def _load_script(name: str) -> str:
    return (files("relay_idem.store") / "lua" / name).read_text()


LUA_BEGIN = _load_script("begin.lua")
LUA_COMPLETE = _load_script("complete.lua")
LUA_RELEASE = _load_script("release.lua")
LUA_EXTEND = _load_script("extend.lua")


def _milliseconds(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _host_ports(netloc: str, url: str) -> list[tuple[str, int]]:
    nodes = []
    for node in netloc.rpartition("@")[2].split(","):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port in {url!r}, got {node!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def client_from_url(url: str, **options: Any) -> RedisClient:
    """A redis-py asyncio client for any URL form SPEC §1 names.

    ``redis://``, ``rediss://`` and ``unix://`` go to ``Redis.from_url``;
    ``redis+cluster://h:p,h:p`` to ``RedisCluster``; ``redis+sentinel://h:p,h:p/service[/db]``
    to the primary that Sentinel names, rediscovered after a failover.
    """
    options.setdefault("socket_timeout", DEFAULT_SOCKET_TIMEOUT)
    options.setdefault("socket_connect_timeout", DEFAULT_SOCKET_TIMEOUT)
    parts = urlsplit(url)
    credentials: dict[str, Any] = {
        name: unquote(value) for name, value in (("username", parts.username), ("password", parts.password)) if value
    }
    if parts.scheme in ("redis", "rediss", "unix"):
        # Under a burst, wait for a pooled connection rather than fail with "Too many connections".
        options.setdefault("max_connections", DEFAULT_MAX_CONNECTIONS)
        options.setdefault("timeout", DEFAULT_POOL_TIMEOUT)
        return Redis.from_pool(BlockingConnectionPool.from_url(url, **options))
    if parts.scheme == "redis+cluster":
        nodes = [ClusterNode(host, port) for host, port in _host_ports(parts.netloc, url)]
        return RedisCluster(startup_nodes=nodes, **credentials, **options)
    if parts.scheme == "redis+sentinel":
        service, _, db = parts.path.strip("/").partition("/")
        if not service or (db and not db.isdigit()):
            raise ValueError(f"expected redis+sentinel://host:port[,host:port]/service[/db], got {url!r}")
        sentinel = Sentinel(_host_ports(parts.netloc, url), **options)  # type: ignore[no-untyped-call]
        primary: Redis = sentinel.master_for(service, db=int(db or 0), **credentials)
        return primary
    raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} in {url!r}")


class RedisStore:
    """The :class:`~relay_idem.Store` contract on Redis.

    Each record is one hash (``t``: owner token while in progress, ``d``: msgpack record), and each
    operation is one ``EVALSHA`` of a script that touches only that key, so the same scripts run on
    a standalone server, behind Sentinel and on Cluster. Completions and releases are published on
    ``<prefix>:done``; one shared subscription per store wakes every waiting repeat.
    """

    def __init__(self, redis: RedisClient, *, prefix: str = "relay-idem") -> None:
        self.redis = redis
        self.prefix = prefix
        self.channel = f"{prefix}:done"
        self.lua_begin = redis.register_script(LUA_BEGIN)
        self.lua_complete = redis.register_script(LUA_COMPLETE)
        self.lua_release = redis.register_script(LUA_RELEASE)
        self.lua_extend = redis.register_script(LUA_EXTEND)
        self.notifier = Notifier(redis, self.channel)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "relay-idem", **options: Any) -> RedisStore:
        """A store on a new client for ``url``; ``options`` go to the redis-py client."""
        return cls(client_from_url(url, **options), prefix=prefix)

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def begin(self, key: str, fingerprint: bytes, lock_ttl: float) -> Claim:
        token = secrets.token_hex(16)
        record = Record(fingerprint, time.time())
        args = (encode_record(record), token, _milliseconds(lock_ttl))
        existing = await self._call(lambda: self.lua_begin(keys=(key,), args=args))
        if existing is None:
            return Claim(record, token)
        _owner, data = existing
        return Claim(decode_record(data))

    async def complete(self, key: str, token: str, record: Record, ttl: float) -> bool:
        args = (token, encode_record(record), _milliseconds(ttl), self.channel)
        return bool(await self._call(lambda: self.lua_complete(keys=(key,), args=args)))

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._call(lambda: self.lua_release(keys=(key,), args=(token, self.channel))))

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        args = (token, _milliseconds(lock_ttl))
        return bool(await self._call(lambda: self.lua_extend(keys=(key,), args=args)))

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
        await self._call(self.redis.ping)

    async def close(self) -> None:
        await self.notifier.close()
        await self.redis.aclose()
