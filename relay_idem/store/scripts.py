"""Running the store's Lua scripts: over the multiplexed connection, or through a redis-py client.

Both run a script as one ``EVALSHA`` that reloads it after ``NOSCRIPT``. With ``min_replicas``,
a write is followed by ``WAIT`` on the same connection, as ``WAIT`` only counts the writes of the
connection it is sent on.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any, Protocol

from redis.asyncio import Redis, RedisCluster

from relay_idem.exceptions import StoreUnavailable
from relay_idem.store.multiplexed import Arg, MultiplexedRedis, ResponseError


def _load_script(name: str) -> str:
    return (files("relay_idem.store") / "lua" / name).read_text()


LUA_BEGIN = _load_script("begin.lua")
LUA_COMPLETE = _load_script("complete.lua")
LUA_RELEASE = _load_script("release.lua")
LUA_EXTEND = _load_script("extend.lua")
SCRIPTS = (LUA_BEGIN, LUA_COMPLETE, LUA_RELEASE, LUA_EXTEND)


class Replication:
    """``min_replicas``: how many replicas must acknowledge a write, and how long they may take."""

    def __init__(self, min_replicas: int, timeout: float) -> None:
        if min_replicas < 0:
            raise ValueError(f"min_replicas must not be negative, not {min_replicas}")
        self.min_replicas = min_replicas
        self.timeout_ms = max(1, int(timeout * 1000))

    def command(self) -> tuple[Arg, ...]:
        return ("WAIT", self.min_replicas, self.timeout_ms)

    def check(self, acknowledged: int) -> None:
        if acknowledged < self.min_replicas:
            raise StoreUnavailable(
                f"{acknowledged} of {self.min_replicas} replicas acknowledged the write in {self.timeout_ms} ms"
            )


class ScriptRunner(Protocol):
    async def run(self, script: str, key: str, args: tuple[Arg, ...], *, replicated: bool = False) -> Any: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class MultiplexedRunner:
    """Scripts over one pipelined connection per process: the fast path for standalone and Sentinel."""

    def __init__(self, connection: MultiplexedRedis, replication: Replication | None) -> None:
        self.connection = connection
        self.replication = replication
        self.shas = {script: connection.register_script(script) for script in SCRIPTS}

    async def run(self, script: str, key: str, args: tuple[Arg, ...], *, replicated: bool = False) -> Any:
        command = ("EVALSHA", self.shas[script], 1, key, *args)
        try:
            if replicated and self.replication is not None:
                reply, acknowledged = await self.connection.execute_pipelined(command, self.replication.command())
                self.replication.check(acknowledged)
                return reply
            return await self.connection.execute(*command)
        except ResponseError as exc:
            if str(exc).startswith("READONLY"):
                # A failover demoted the server we talk to: ask Sentinel again on the next call.
                self.connection.reset("the server is read-only now")
            raise StoreUnavailable(f"Redis answered: {exc}") from exc

    async def ping(self) -> None:
        await self.connection.execute("PING")

    async def close(self) -> None:
        await self.connection.aclose()


class RedisPyRunner:
    """Scripts through a redis-py client: for Cluster, TLS and clients the caller made."""

    def __init__(self, redis: Redis | RedisCluster, replication: Replication | None) -> None:
        if replication is not None and isinstance(redis, RedisCluster):
            raise ValueError("min_replicas is not supported on Redis Cluster; use standalone or Sentinel")
        self.redis = redis
        self.replication = replication
        self.scripts = {script: redis.register_script(script) for script in SCRIPTS}

    async def run(self, script: str, key: str, args: tuple[Arg, ...], *, replicated: bool = False) -> Any:
        if not (replicated and self.replication is not None):
            return await self.scripts[script](keys=(key,), args=args)
        assert isinstance(self.redis, Redis)
        async with self.redis.pipeline(transaction=False) as pipeline:
            await self.scripts[script](keys=(key,), args=args, client=pipeline)
            pipeline.execute_command(*self.replication.command())
            reply, acknowledged = await pipeline.execute()
        self.replication.check(acknowledged)
        return reply

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        return None
