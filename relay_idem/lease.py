"""Keeping a claim while its work runs, and waiting for another owner's outcome.

One mechanism for every claim: an HTTP request the middleware runs (``execution.py``) and an
idempotent function (``functions.py``) both renew their lease here, and a repeat that waits for
the first owner does it with :func:`wait_for_outcome`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from relay_idem.exceptions import StoreUnavailable
from relay_idem.metrics import STORE_TIME
from relay_idem.store.base import Claim, Store

logger = logging.getLogger(__name__)


class Lease:
    """Renews the claim ``token`` holds on ``key`` every ``lock_ttl / 3`` from :meth:`start` to :meth:`stop`.

    The first renewal is a timer, not a task: most work ends before it is due, and a timer costs
    less to set and cancel. A lost lease (another owner took the key) is logged and ends renewal;
    the owner token refuses the late completion, so it is never fatal.
    """

    def __init__(self, store: Store, key: str, token: str, lock_ttl: float, key_hint: str) -> None:
        self.store = store
        self.key = key
        self.token = token
        self.lock_ttl = lock_ttl
        self.key_hint = key_hint
        self.confirmed_at = time.monotonic()  # when the store last confirmed the lease
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the running loop, if the caller has it (each look-up is a ``getpid`` call on Python 3.11)."""
        self.timer = (loop or asyncio.get_running_loop()).call_later(self.lock_ttl / 3, self.start_renewing)

    def start_renewing(self) -> None:
        self.task = asyncio.create_task(self.renew())

    def stop(self) -> None:
        """Before the outcome is written: a renewal that ran after it would find the claim gone."""
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

    async def renew(self) -> None:
        while True:
            started = time.perf_counter()
            try:
                renewed = await self.store.renew(self.key, self.token, self.lock_ttl)
            except StoreUnavailable as exc:
                logger.warning("relay-idem: lease renewal failed (%s) (key %s…)", exc, self.key_hint)
            else:
                STORE_TIME["renew"].observe(time.perf_counter() - started)
                if not renewed:
                    logger.warning("relay-idem: lease lost while the work was running (key %s…)", self.key_hint)
                    return
                self.confirmed_at = time.monotonic()
            await asyncio.sleep(self.lock_ttl / 3)


async def wait_for_outcome(
    store: Store,
    key: str,
    claim: Claim,
    looked_at: float,
    timeout: float,
    begin: Callable[[], Awaitable[Claim]],
    gone: asyncio.Future[None] | None = None,
) -> Claim | None:
    """Wait for the first owner of ``key`` to finish: its completion, its release (``begin`` takes the key
    over) or ``timeout`` after ``looked_at``. Woken by the store's notification (SPEC §6a), not by polling.

    Returns the last claim seen (one still in progress means the wait timed out), or None if ``gone``
    (the waiter's client went away) finished first.
    """
    deadline = looked_at + timeout
    woken: asyncio.Future[None] | None = None
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            if gone is None:
                await store.wait(key, looked_at, remaining)
            else:
                woken = asyncio.ensure_future(store.wait(key, looked_at, remaining))
                await asyncio.wait((woken, gone), return_when=asyncio.FIRST_COMPLETED)
                if not woken.done():
                    return None
                woken.result()
            looked_at = time.monotonic()
            claim = await begin()
            if claim.acquired or claim.record.response is not None:
                return claim
        return claim
    finally:
        if woken is not None:
            woken.cancel()
