"""MemoryStore: records in this process, for a single process, demos and tests."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from dataclasses import dataclass

from relay_idem.store.base import Claim, Record, RecordInfo, owner_token
from relay_idem.store.changes import RecentChanges


@dataclass(slots=True)
class _Entry:
    record: Record
    expires_at: float
    token: str | None = None


class MemoryStore:
    """The :class:`~relay_idem.Store` contract on a dict. Waiters are woken by events, not polling.

    Expired records are swept as new ones arrive, so a stream of unique keys keeps memory bounded
    by ``ttl``. Records are not shared between processes: with several workers, use ``RedisStore``.
    """

    def __init__(self, *, prefix: str = "relay-idem") -> None:
        self.prefix = prefix
        self._entries: dict[str, _Entry] = {}
        self._expiries: list[tuple[float, str]] = []
        self._changes = RecentChanges()
        self._events: dict[str, asyncio.Event] = {}

    def _notify(self, key: str) -> None:
        self._changes.mark(key)
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at <= now:
            del self._entries[key]
            return None
        return entry

    def _sweep(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, key = heapq.heappop(self._expiries)
            self._live(key, now)

    def _put(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        heapq.heappush(self._expiries, (entry.expires_at, key))

    def _owned(self, key: str, token: str) -> _Entry | None:
        entry = self._live(key, time.monotonic())
        return entry if entry is not None and entry.token == token else None

    async def begin(self, key: str, fingerprint: bytes, lock_ttl: float) -> Claim:
        now = time.monotonic()
        self._sweep(now)
        entry = self._live(key, now)
        if entry is not None:
            return Claim(entry.record)
        token = owner_token()
        record = Record(fingerprint, time.time())
        self._put(key, _Entry(record, now + lock_ttl, token))
        return Claim(record, token)

    async def complete(self, key: str, token: str, record: Record, ttl: float) -> bool:
        entry = self._live(key, time.monotonic())
        if entry is not None and entry.token != token:
            return entry.token is None and entry.record == record  # a retry of a write that landed
        self._put(key, _Entry(record, time.monotonic() + ttl))
        self._notify(key)
        return True

    async def release(self, key: str, token: str) -> bool:
        if self._owned(key, token) is None:
            return False
        del self._entries[key]
        self._notify(key)
        return True

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        entry = self._owned(key, token)
        if entry is None:
            return False
        entry.expires_at = time.monotonic() + lock_ttl
        heapq.heappush(self._expiries, (entry.expires_at, key))
        return True

    async def wait(self, key: str, since: float, timeout: float) -> None:
        if self._changes.changed_since(key, since):
            return
        entry = self._live(key, time.monotonic())
        if entry is None or entry.token is None:
            return
        # An owner that vanished without releasing frees the key when its lease ends.
        timeout = min(timeout, entry.expires_at - time.monotonic())
        event = self._events.setdefault(key, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def get(self, key: str) -> RecordInfo | None:
        now = time.monotonic()
        entry = self._live(key, now)
        return None if entry is None else RecordInfo(entry.record, entry.expires_at - now)

    async def delete(self, key: str) -> bool:
        if self._live(key, time.monotonic()) is None:
            return False
        del self._entries[key]
        self._notify(key)
        return True

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
