"""The store contract: what the middleware needs from wherever records live.

One record per (scope, key). While the first request runs, the record is *in progress* and
holds the owner's token; once it finishes, the record is *completed* and holds the response.
``begin`` claims a key or reads what is there in one step; every write after it names the
owner token, so a finisher that lost its lease can never overwrite a newer owner.
"""

from __future__ import annotations

import itertools
import os
import secrets
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Headers = tuple[tuple[bytes, bytes], ...]


class _OwnerTokens:
    """Owner tokens: a random prefix per process and a counter, so a claim costs no ``getrandom``
    system call (``secrets.token_hex`` makes one per call).

    A token only has to differ from every other owner's (fencing, SPEC §3.2); 64 random bits per
    process and a counter never repeat. A forked child draws a prefix of its own.
    """

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


owner_token = _OwnerTokens()


# StoredResponse, Record and Claim are made on every keyed request, so they are not frozen: a frozen
# dataclass's __init__ sets each field through object.__setattr__, ~7x the time of plain slots
# (benchmarks/README.md, "The hot path"). Treat them as immutable all the same; they stay hashable.
@dataclass(slots=True, unsafe_hash=True)
class StoredResponse:
    """What a repeat gets back. ``body_omitted`` marks a tombstone whose body was not kept."""

    status: int
    headers: Headers
    body: bytes
    body_omitted: bool = False


@dataclass(slots=True, unsafe_hash=True)
class Record:
    """One key's state. ``response`` is None while the first request is still in progress."""

    fingerprint: bytes
    created_at: float
    response: StoredResponse | None = None


@dataclass(slots=True, unsafe_hash=True)
class Claim:
    """The answer to ``begin``: ours (``token`` set, ``record`` is the one we wrote) or someone else's."""

    record: Record
    token: str | None = None

    @property
    def acquired(self) -> bool:
        return self.token is not None


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """A record as an operator sees it: the record and the seconds it has left."""

    record: Record
    ttl: float | None


@runtime_checkable
class Store(Protocol):
    """Where records live. ``MemoryStore`` and ``RedisStore`` implement it; so can anyone else.

    Every method raises :class:`~relay_idem.exceptions.StoreUnavailable` when the backend cannot
    answer. Times are seconds.
    """

    prefix: str

    async def begin(self, key: str, fingerprint: bytes, lock_ttl: float) -> Claim:
        """Claim ``key`` for ``lock_ttl`` seconds if it is free; otherwise return what it holds."""

    async def complete(self, key: str, token: str, record: Record, ttl: float) -> bool:
        """Store the finished ``record`` for ``ttl`` seconds. False: another owner holds the key, or it holds
        another outcome. A key that already holds this very record is True, so a write can be retried
        after a failure that came after the store took it."""

    async def release(self, key: str, token: str) -> bool:
        """Delete our claim so that a retry executes again. False: it was no longer ours."""

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        """Extend our claim's lease. False: it was no longer ours."""

    async def wait(self, key: str, since: float, timeout: float) -> None:
        """Return when ``key`` may have changed after ``since`` (``time.monotonic``), or after ``timeout``."""

    async def get(self, key: str) -> RecordInfo | None:
        """The record under ``key`` and its remaining lifetime, for operators."""

    async def delete(self, key: str) -> bool:
        """Remove the record under ``key``, whatever its state."""

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""

    async def close(self) -> None:
        """Release connections and background tasks."""
