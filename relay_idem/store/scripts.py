"""Running the store's Lua scripts: over the multiplexed connection, or through a redis-py client.

Both run a script as one ``EVALSHA`` that reloads it after ``NOSCRIPT``. With ``min_replicas``,
a write is followed by ``WAIT`` on the same connection, as ``WAIT`` only counts the writes of the
connection it is sent on. Those pairs go over redis-py's pooled connections, never the
multiplexed one: Redis answers nothing else on a connection while a ``WAIT`` blocks it, so one
slow replica would stall every call of the process queued behind it.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any, Protocol

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from relay_idem.exceptions import StoreUnavailable
from relay_idem.store.multiplexed import Arg, MultiplexedRedis, ResponseError


def _load_script(name: str) -> str:
    return (files("relay_idem.store") / "lua" / name).read_text()


LUA_BEGIN = _load_script("begin.lua")
LUA_COMPLETE = _load_script("complete.lua")
LUA_RELEASE = _load_script("release.lua")
LUA_EXTEND = _load_script("extend.lua")
SCRIPTS = (LUA_BEGIN, LUA_COMPLETE, LUA_RELEASE, LUA_EXTEND)


class NotReplicated(StoreUnavailable):
    """Fewer than ``min_replicas`` replicas acknowledged a write in time; ``reply`` is the script's own reply."""

    def __init__(self, message: str, reply: Any) -> None:
        super().__init__(message)
        self.reply = reply


class Replication:
    """``min_replicas``: how many replicas must acknowledge a write, and how long they may take."""

    def __init__(self, min_replicas: int, timeout: float) -> None:
        if min_replicas < 0:
            raise ValueError(f"min_replicas must not be negative, not {min_replicas}")
        self.min_replicas = min_replicas
        self.timeout_ms = max(1, int(timeout * 1000))

    def command(self) -> tuple[Arg, ...]:
        return ("WAIT", self.min_replicas, self.timeout_ms)

    def check(self, acknowledged: int, reply: Any) -> None:
        if acknowledged < self.min_replicas:
            raise NotReplicated(
                f"{acknowledged} of {self.min_replicas} replicas acknowledged the write in {self.timeout_ms} ms",
                reply,
            )


class ScriptRunner(Protocol):
    async def run(self, script: str, key: str, args: tuple[Arg, ...], *, replicated: bool = False) -> Any: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class MultiplexedRunner:
    """Scripts over one pipelined connection per process: the fast path for standalone and Sentinel.

    With ``replicated``, the writes that must wait for replicas go through that runner instead.
    """

    def __init__(self, connection: MultiplexedRedis, replicated: RedisPyRunner | None = None) -> None:
        self.connection = connection
        self.replicated = replicated
        self.shas = {script: connection.register_script(script) for script in SCRIPTS}

    async def run(self, script: str, key: str, args: tuple[Arg, ...], *, replicated: bool = False) -> Any:
        if replicated and self.replicated is not None:
            return await self.replicated.run(script, key, args, replicated=True)
        try:
            return await self.connection.execute("EVALSHA", self.shas[script], 1, key, *args)
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
    """Scripts through a redis-py client: for Cluster, TLS, clients the caller made, and ``min_replicas``."""

    def __init__(self, redis: Redis | RedisCluster, replication: Replication | None) -> None:
        if replication is not None and isinstance(redis, RedisCluster):
            raise ValueError("min_replicas is not supported on Redis Cluster; use standalone or Sentinel")
        self.redis = redis
        self.replication = replication
        self.scripts = {script: redis.register_script(script) for script in SCRIPTS}

    async def run(self, script: str, key: str, args: tuple[Arg, ...], *, replicated: bool = False) -> Any:
        if isinstance(self.redis, RedisCluster):
            try:
                return await self.redis.evalsha(self.scripts[script].sha, 1, key, *args)
            except NoScriptError:
                # After a failover the new primary lacks the script. EVAL runs and caches it on the
                # key's own node; redis-py's Script would SCRIPT LOAD on every primary, and fail
                # while any one of them is down.
                return await self.redis.eval(script, 1, key, *args)
        if replicated and self.replication is not None:
            return await self.run_replicated(self.redis, self.replication, script, key, args)
        return await self.scripts[script](keys=(key,), args=args)

    async def run_replicated(
        self, redis: Redis, replication: Replication, script: str, key: str, args: tuple[Arg, ...]
    ) -> Any:
        """``EVALSHA`` and ``WAIT`` in one round trip on one pooled connection (``EVAL`` after ``NOSCRIPT``).

        Not redis-py's pipelined Script, which asks ``SCRIPT EXISTS`` first on every call.
        """
        command: tuple[Arg, ...] = ("EVALSHA", self.scripts[script].sha, 1, key, *args)
        for _ in range(2):
            async with redis.pipeline(transaction=False) as pipeline:
                pipeline.execute_command(*command)
                pipeline.execute_command(*replication.command())
                reply, acknowledged = await pipeline.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError):
                command = ("EVAL", script, 1, key, *args)
                continue
            for outcome in (reply, acknowledged):
                if isinstance(outcome, Exception):
                    raise outcome
            replication.check(acknowledged, reply)
            return reply
        raise StoreUnavailable(f"Redis reported the script missing twice: {reply}")

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        return None
