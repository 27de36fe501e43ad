"""One shared Redis subscription per store that wakes the repeats waiting on a key (``on_conflict="wait"``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.exceptions import RedisError

from relay_idem.store.changes import RecentChanges

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

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self._subscribed.set()
                async for message in pubsub.listen():
                    self._notify(message["data"].decode())
            except (RedisError, OSError) as exc:
                logger.warning("relay-idem: subscription to %s lost (%s); retrying", self._channel, exc)
            finally:
                self._subscribed.clear()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(RECONNECT_DELAY)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
