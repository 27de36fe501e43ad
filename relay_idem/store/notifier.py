"""One shared Redis subscription per store that wakes the repeats waiting on a key (``on_conflict="wait"``).

The subscription follows the topology: on Cluster it may sit on any node (a ``PUBLISH`` from a
script reaches subscribers on every node), and after it fails it moves to the next node, since
redis-py's ``ClusterPubSub`` would stay on a dead one; behind Sentinel the primary watcher moves
it when Sentinel names another primary (:meth:`Notifier.follow_primary`). While it is down, waiters
look at their key every ``POLL_INTERVAL``; once it stands again, every waiter looks at once, since
messages published meanwhile were missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from relay_idem.store.changes import RecentChanges
from relay_idem.store.topology import Address, is_teardown_race

logger = logging.getLogger(__name__)

# A waiter looks at its key again at least this often, so a claim whose owner died (no message is
# ever published for it) is taken over soon after its lease ends: at most 2 store commands a second.
POLL_INTERVAL = 0.5
RECONNECT_DELAY = 0.5


class Notifier:
    """Routes messages on ``channel`` (payload: a record key) to the waiters of that key."""

    def __init__(self, redis: Any, channel: str) -> None:
        self._redis = redis
        self._channel = channel
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._changes = RecentChanges()
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()  # listeners cancelled by _restart, closing
        self._pubsub: Any = None  # the current listener's subscription
        self._failures = 0

    async def wait(self, key: str, since: float, timeout: float) -> None:
        if self._changes.changed_since(key, since):
            return
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="relay-idem-notifier")
        if not self._subscribed.is_set():
            # A completion published before the subscription stands would go unseen: once it
            # stands, the caller looks at the key again instead.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), min(timeout, POLL_INTERVAL))
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, set())
        waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, min(timeout, POLL_INTERVAL))
        except TimeoutError:
            pass
        finally:
            waiters.discard(waiter)
            if not waiters:
                self._waiters.pop(key, None)

    def _notify(self, key: str) -> None:
        self._changes.mark(key)
        for waiter in self._waiters.pop(key, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _wake_everyone(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _open(self) -> Any:
        if not isinstance(self._redis, RedisCluster):
            return self._redis.pubsub(ignore_subscribe_messages=True)
        await self._redis.initialize()
        nodes = self._redis.get_nodes()
        if not nodes:
            raise RedisClusterException("no cluster node is known")
        # Any node hears every PUBLISH; after a failure, the next one.
        node = nodes[self._failures % len(nodes)]
        return self._redis.pubsub(node=node, ignore_subscribe_messages=True)

    async def _listen(self) -> None:
        while True:
            pubsub: Any = None
            try:
                pubsub = self._pubsub = await self._open()
                await pubsub.subscribe(self._channel)
                self._subscribed.set()
                self._wake_everyone()
                async for message in pubsub.listen():
                    self._notify(message["data"].decode())
            except (RedisError, RedisClusterException, OSError, AttributeError) as exc:
                if isinstance(exc, AttributeError) and not is_teardown_race(exc):
                    raise
                self._failures += 1
                logger.warning("relay-idem: subscription to %s lost (%s); retrying", self._channel, exc)
            finally:
                if self._pubsub is pubsub:
                    self._subscribed.clear()
                    self._pubsub = None
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError, AttributeError):
                        await pubsub.aclose()
            await asyncio.sleep(RECONNECT_DELAY)

    def follow_primary(self, primary: Address) -> None:
        """Resubscribe if the subscription is on a server other than ``primary`` (Sentinel's answer)."""
        connection = getattr(self._pubsub, "connection", None)
        if connection is None or connection.host is None:
            return
        if (str(connection.host), int(connection.port)) != primary:
            logger.warning("relay-idem: moving the subscription to %s to the new primary", self._channel)
            self._restart()

    def _restart(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._retiring.add(self._listener)
            self._listener.add_done_callback(self._retiring.discard)
        self._subscribed.clear()
        self._pubsub = None
        self._listener = asyncio.create_task(self._listen(), name="relay-idem-notifier")

    async def close(self) -> None:
        listeners = [*self._retiring, *([self._listener] if self._listener is not None else [])]
        self._listener = None
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
