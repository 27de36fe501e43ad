"""Outcome writes the store failed to take, kept and retried until they land (SPEC §3.8).

The app has run and its response has gone to the client (or an idempotent function has run and
its caller has its value: ``functions.py`` keeps its writes here too); only the write of its
outcome (or the release of a key whose outcome is not final) failed. Giving up there would let
the claim expire and the client's next repeat execute the request a second time, so the process
keeps the write and tries again, 50 ms after the failure, then doubling up to 1 s (at most
``lock_ttl / 4``, so that a store that comes back is written to well within the lease), each
delay jittered. It ends:

- stored: counted ``executed`` (in ``outcomes``: the HTTP requests' counter, or the functions');
  or, for a release, the key is free again;
- refused: a newer owner holds the key (its lease ran out and another request claimed it) —
  fenced, counted as lease lost and ``not_stored``, logged;
- ``complete_retry`` ran out: counted ``not_stored`` and ``relay_idem_writes_given_up_total``,
  logged once. A release also ends, quietly, once its lease has surely run out: the key has
  freed itself.

While a completion waits, its claim is renewed every ``lock_ttl / 3`` whenever the store answers,
so a repeat gets 409 (or waits) and never executes a second time. A write retried after a failure
that came after Redis had run it (a lost reply) is recognised by ``complete.lua``: the key holds
this very record.

Memory stays bounded: each middleware (and each idempotent function) keeps at most
``MAX_PENDING_WRITES`` writes holding at most ``MAX_PENDING_BYTES`` of response bodies; past
either, the oldest are given up (``reason="overflow"``). :meth:`PendingWrites.drain` waits for
all of them, which each end within ``complete_retry``: graceful shutdown calls it;
:func:`drain_pending_writes` does it for every middleware and function of the process.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from relay_idem.exceptions import StoreUnavailable
from relay_idem.metrics import GIVEN_UP, LEASE_LOST, OUTCOME, PENDING_WRITES, Count

if TYPE_CHECKING:
    from relay_idem.store.base import Record, Store

logger = logging.getLogger(__name__)

MAX_PENDING_WRITES = 10_000
MAX_PENDING_BYTES = 64 * 1024 * 1024
FIRST_DELAY = 0.05
MAX_DELAY = 1.0


class WriteOptions(Protocol):
    """What a pending write needs of its owner's options: an ``IdempotencyConfig``, or an idempotent function."""

    @property
    def ttl(self) -> float: ...

    @property
    def lock_ttl(self) -> float: ...

    @property
    def complete_retry(self) -> float: ...


def completion_counted(stored: bool, key_hint: str, outcomes: Mapping[str, Count] = OUTCOME) -> None:
    """Count a completion the store answered: stored, or refused because a newer owner holds the key."""
    if stored:
        outcomes["executed"].inc()
        return
    outcomes["not_stored"].inc()
    LEASE_LOST.inc()
    logger.warning("relay-idem: lease lost; a newer owner holds the key, outcome not stored (key %s…)", key_hint)


class PendingWrite:
    """One completion (``record``) or release (``record is None``) that the store failed to take."""

    def __init__(
        self,
        store: Store,
        key: str,
        token: str,
        record: Record | None,
        *,
        config: WriteOptions,
        leased_at: float,
        key_hint: str,
        error: StoreUnavailable,
        outcomes: Mapping[str, Count] = OUTCOME,
    ) -> None:
        self.store = store
        self.key = key
        self.token = token
        self.record = record
        self.size = 0 if record is None or record.response is None else len(record.response.body)
        self.ttl = config.ttl
        self.lock_ttl = config.lock_ttl
        self.key_hint = key_hint
        self.error = error
        self.outcomes = outcomes  # where executed / not_stored are counted, once the write has ended
        self.failed_at = time.monotonic()
        self.deadline = self.failed_at + config.complete_retry
        # When the store last confirmed our lease (time.monotonic()): it ends lock_ttl after, at the latest.
        self.leased_at = leased_at
        self.renewable = record is not None
        self.settled = False

    def end(self) -> float:
        """When to stop: the deadline; for a release, sooner if the lease has run out by then."""
        if self.record is None:
            return min(self.deadline, self.leased_at + self.lock_ttl)
        return self.deadline

    async def run(self) -> None:
        delay = FIRST_DELAY
        longest = min(MAX_DELAY, self.lock_ttl / 4)
        while True:
            end = self.end()
            now = time.monotonic()
            if now >= end:
                self.expire()
                return
            await asyncio.sleep(min(end - now, delay * random.uniform(0.5, 1.0)))
            delay = min(delay * 2, longest)
            if await self.attempt():
                return

    async def attempt(self) -> bool:
        """One more try; True once the write is settled."""
        try:
            if self.record is None:
                await self.store.release(self.key, self.token)
            else:
                stored = await self.store.complete(self.key, self.token, self.record, self.ttl)
        except StoreUnavailable as exc:
            self.error = exc
            await self.renew_if_due()
            return False
        self.settled = True
        retried = time.monotonic() - self.failed_at
        if self.record is None:
            logger.info("relay-idem: key released after %.1f s of retries (key %s…)", retried, self.key_hint)
            return True
        completion_counted(stored, self.key_hint, self.outcomes)
        if stored:
            logger.info("relay-idem: outcome stored after %.1f s of retries (key %s…)", retried, self.key_hint)
        return True

    async def renew_if_due(self) -> None:
        """Keep a completion's claim while the store answers renewals but not the write."""
        if not self.renewable or time.monotonic() - self.leased_at < self.lock_ttl / 3:
            return
        try:
            self.renewable = await self.store.renew(self.key, self.token, self.lock_ttl)
        except StoreUnavailable:
            return
        if self.renewable:
            self.leased_at = time.monotonic()

    def expire(self) -> None:
        if self.record is None and time.monotonic() < self.deadline:
            self.settled = True
            logger.info("relay-idem: lease over while its release was retried: key free (key %s…)", self.key_hint)
            return
        self.give_up("timeout")

    def give_up(self, reason: str) -> None:
        """Count and log, once, a write that will not be retried any more."""
        if self.settled:
            return
        self.settled = True
        GIVEN_UP[reason].inc()
        why = {
            "timeout": f"for complete_retry ({self.deadline - self.failed_at:g} s)",
            "overflow": "while too many other writes were pending",
            "stopped": "until the process stopped retrying",
        }[reason]
        if self.record is None:
            logger.warning(
                "relay-idem: could not release the key (%s) %s; it frees itself after lock_ttl (key %s…)",
                self.error,
                why,
                self.key_hint,
            )
            return
        self.outcomes["not_stored"].inc()
        logger.warning(
            "relay-idem: could not store the outcome (%s) %s; a retry will execute again (key %s…)",
            self.error,
            why,
            self.key_hint,
        )


# Every middleware's and idempotent function's pending writes in this process, for drain_pending_writes().
EVERY_PENDING: weakref.WeakSet[PendingWrites] = weakref.WeakSet()


class PendingWrites:
    """The writes one middleware (or idempotent function) is retrying, oldest first, each in a task of its own."""

    def __init__(self, limit: int = MAX_PENDING_WRITES, limit_bytes: int = MAX_PENDING_BYTES) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.bytes = 0  # response bodies held by the pending writes
        self.tasks: dict[asyncio.Task[None], PendingWrite] = {}
        EVERY_PENDING.add(self)

    def __len__(self) -> int:
        return len(self.tasks)

    def add(self, write: PendingWrite) -> None:
        if write.deadline <= write.failed_at:  # complete_retry=0: no retries
            write.give_up("timeout")
            return
        logger.info(
            "relay-idem: outcome write failed (%s); retrying for up to %g s (key %s…)",
            write.error,
            write.deadline - write.failed_at,
            write.key_hint,
        )
        while self.tasks and (len(self.tasks) >= self.limit or self.bytes + write.size > self.limit_bytes):
            oldest = next(iter(self.tasks))
            self.forget(oldest).give_up("overflow")
            oldest.cancel()
        if write.size > self.limit_bytes:
            write.give_up("overflow")
            return
        task = asyncio.get_running_loop().create_task(write.run())
        self.tasks[task] = write
        self.bytes += write.size
        PENDING_WRITES.inc()
        task.add_done_callback(self.finished)

    def forget(self, task: asyncio.Task[None]) -> PendingWrite:
        write = self.tasks.pop(task)
        self.bytes -= write.size
        return write

    def finished(self, task: asyncio.Task[None]) -> None:
        PENDING_WRITES.dec()
        write = self.forget(task) if task in self.tasks else None
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("relay-idem: retrying an outcome write failed", exc_info=error)
        if write is not None:
            write.give_up("stopped")  # cancelled with its event loop, or failed: not settled

    async def drain(self) -> None:
        """Return once every pending write has landed or been given up (each within ``complete_retry``)."""
        while self.tasks:
            await asyncio.wait(list(self.tasks))


async def drain_pending_writes() -> None:
    """Wait for every outcome write this process still retries (SPEC §3.8): every middleware's and every
    idempotent function's. Each ends within its ``complete_retry``."""
    for pending in list(EVERY_PENDING):
        await pending.drain()
