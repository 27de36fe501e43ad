"""Following a changing Redis topology: the Sentinel primary watcher, and a redis-py Cluster workaround.

Sentinel: after a forced failover (``SENTINEL FAILOVER``) the old primary lives on and accepts
writes for some 10 s, until Sentinel demotes it, and those writes are then lost. A connection
that only asks Sentinel when it reconnects keeps writing there all that time. The
:class:`PrimaryWatcher` asks Sentinel for the primary every ``interval`` seconds and moves
every connection of the process that still goes to another server: the multiplexed connection,
redis-py's pooled connections and the wait-mode subscription. That shrinks the window to about
``interval``; ``min_replicas`` (``WAIT``) turns the writes of that window into store errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisError

from relay_idem.store.multiplexed import MultiplexedRedis

logger = logging.getLogger(__name__)

Address = tuple[str, int]

# How often each process asks Sentinel which server is the primary: the longest a connection
# keeps writing to a demoted (or soon to be demoted) primary.
PRIMARY_CHECK_INTERVAL = 0.5


def is_teardown_race(exc: BaseException) -> bool:
    """redis-py 8.1's asyncio RedisCluster closed a connection another task was still opening.

    The command then fails with ``AttributeError: 'NoneType' object has no attribute 'writelines'``
    (README, known issues). Connections being torn down is a store outage, not a bug of ours.
    """
    return isinstance(exc, AttributeError) and exc.obj is None


class PrimaryWatcher:
    """Asks Sentinel for the primary every ``interval`` seconds and moves the process's connections to it.

    ``followers`` are called with every answer (so a subscription can check where it is
    connected); :meth:`start` is cheap to call again, :meth:`close` stops the task.
    """

    def __init__(
        self,
        pool: SentinelConnectionPool,
        multiplexed: MultiplexedRedis | None = None,
        *,
        interval: float = PRIMARY_CHECK_INTERVAL,
    ) -> None:
        self.pool = pool
        self.multiplexed = multiplexed
        self.interval = interval
        self.followers: list[Callable[[Address], None]] = []
        self.primary: Address | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="relay-idem-primary-watcher")

    async def _run(self) -> None:
        unreachable = False
        while True:
            try:
                async with asyncio.timeout(max(self.interval * 4, 2.0)):
                    await self.check()
            except (RedisError, OSError, TimeoutError) as exc:
                if not unreachable:
                    logger.warning("relay-idem: Sentinel did not name a primary (%s); asking again", exc)
                unreachable = True
            else:
                unreachable = False
            await asyncio.sleep(self.interval)

    async def check(self) -> Address:
        """Ask Sentinel once, and move every connection that goes elsewhere."""
        # Also disconnects redis-py's idle pooled connections when the primary changed.
        host, port = await self.pool.get_master_address()  # type: ignore[no-untyped-call]
        address = (str(host), int(port))
        if self.primary is not None and address != self.primary:
            logger.warning("relay-idem: Sentinel names a new primary %s:%d (was %s:%d)", *address, *self.primary)
            # Connections in use go back to the pool marked, and are reconnected there.
            await self.pool.update_active_connections_for_reconnect()  # type: ignore[no-untyped-call]
        self.primary = address
        multiplexed = self.multiplexed
        if multiplexed is not None and multiplexed.peer is not None and multiplexed.peer != address:
            multiplexed.reset(f"Sentinel names {address[0]}:{address[1]} the primary now")
        for follower in self.followers:
            follower(address)
        return address

    async def close(self) -> None:
        """Stop watching, and close the connections to the sentinels themselves."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sentinel in self.pool.sentinel_manager.sentinels:
            await sentinel.aclose()
