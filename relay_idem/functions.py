"""Idempotent functions (SPEC §8.4): ``@idempotent(store, key=...)`` on an ``async def``.

For work that is not an HTTP request (queue consumers, scheduled jobs, event handlers), with the
HTTP claims' protocol and nothing of its own: the same ``Store.begin/complete/release/renew/wait``,
the same record (the return value is a completed record's body, status 200, no headers), the
same lease renewal and wake-up (``lease.py``), and the same fencing by owner token.

    first call for a key       runs the function, stores its encoded value, returns the value
    later call, any process    returns the stored value, decoded; the function does not run
    call while one runs        KeyInProgress (on_conflict="reject"), or waits for the value ("wait")
    different fingerprint      KeyReused
    the function raises        the key is released, the exception propagates unchanged
    value cannot be encoded    the key is released, TypeError
    store down before running  StoreUnavailable; the function does not run
    store down after running   the value is returned at once; the write is kept and retried in the background
                               (pending.py, as HTTP outcomes: SPEC §3.8), the claim renewed meanwhile, so a
                               call with the key gets KeyInProgress (or waits), never a second run; only if
                               complete_retry runs out is it not stored (counted, logged): a later call runs again
    store down at a release    the release is retried the same way, until the lease would have run out anyway
    lease lost while running   the completion is refused by the owner token (counted, logged); the value is returned

Every call is counted once in ``relay_idem_function_calls_total``, when its outcome is known: a
call whose write is pending counts ``executed`` (or ``not_stored``) when the write ends.
``await f.drain()`` on a decorated function (or :func:`~relay_idem.drain_pending_writes`, for every
function and middleware of the process) waits for the writes still pending: call it at shutdown.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, cast

import msgpack

from relay_idem.exceptions import KeyInProgress, KeyReused, StoreUnavailable
from relay_idem.keys import InvalidKey, check_key, key_hint, record_key
from relay_idem.lease import Lease, wait_for_outcome
from relay_idem.metrics import FUNCTION_OUTCOME
from relay_idem.pending import PendingWrite, PendingWrites, completion_counted
from relay_idem.store.base import Claim, Record, Store, StoredResponse

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

FUNCTION_SCOPE = "functions"
# A function's value is a completed record with this status and no headers.
VALUE_STATUS = 200
NO_FINGERPRINT = b""


def encode_value(value: Any) -> bytes:
    """msgpack: None, bool, int, float, str, bytes, and lists and dicts of those."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def decode_value(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _check_seconds(name: str, value: float, *, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value >= 0 if zero else value > 0):
        kind = "a non-negative" if zero else "a positive"
        raise ValueError(f"{name} must be {kind} number of seconds, not {value!r}")


class IdempotentCallable(Protocol[P, R_co]):
    """What ``@idempotent`` makes of an ``async def``: the same call, and :meth:`drain`."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R_co]: ...

    async def drain(self) -> None:
        """Wait for this function's value writes still retried after a store failure (each ends within
        ``complete_retry``)."""


def idempotent(
    store: Store,
    *,
    key: Callable[P, str],
    ttl: float = 86_400.0,
    lock_ttl: float = 10.0,
    fingerprint: Callable[P, bytes] | None = None,
    on_conflict: Literal["reject", "wait"] = "reject",
    wait_timeout: float = 10.0,
    scope: str = FUNCTION_SCOPE,
    encode: Callable[[Any], bytes] | None = None,
    decode: Callable[[bytes], Any] | None = None,
    complete_retry: float = 30.0,
) -> Callable[[Callable[P, Awaitable[R]]], IdempotentCallable[P, R]]:
    """Run the decorated ``async def`` once per key; every later call gets its stored value.

    ``key`` takes the function's arguments and returns the key (1-255 visible ASCII characters);
    ``fingerprint`` too, returning bytes: the same key with another fingerprint raises
    :class:`~relay_idem.KeyReused`. ``complete_retry``: how long a value write the store failed to
    take is retried in the background (SPEC §3.8; 0 turns retries off). See SPEC §8.4 and this
    module's docstring for every outcome.
    """
    if on_conflict not in ("reject", "wait"):
        raise ValueError(f"on_conflict must be 'reject' or 'wait', not {on_conflict!r}")
    for name, value in (("ttl", ttl), ("lock_ttl", lock_ttl), ("wait_timeout", wait_timeout)):
        _check_seconds(name, value)
    _check_seconds("complete_retry", complete_retry, zero=True)
    if not isinstance(scope, str) or not scope:
        raise ValueError(f"scope must be a non-empty string, not {scope!r}")

    def decorate(function: Callable[P, Awaitable[R]]) -> IdempotentCallable[P, R]:
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"@idempotent decorates an async def, not {function!r}")
        runner = IdempotentFunction(
            function,
            store,
            key=key,
            ttl=ttl,
            lock_ttl=lock_ttl,
            fingerprint=fingerprint,
            on_conflict=on_conflict,
            wait_timeout=wait_timeout,
            scope=scope,
            encode=encode or encode_value,
            decode=decode or decode_value,
            complete_retry=complete_retry,
        )

        @functools.wraps(function)
        async def call_once(*args: P.args, **kwargs: P.kwargs) -> R:
            return cast(R, await runner.call(*args, **kwargs))

        call_once.drain = runner.pending.drain  # type: ignore[attr-defined]
        return cast(IdempotentCallable[P, R], call_once)

    return decorate


class IdempotentFunction:
    """One decorated function and its options; :meth:`call` is one call of it."""

    def __init__(
        self,
        function: Callable[..., Awaitable[Any]],
        store: Store,
        *,
        key: Callable[..., str],
        ttl: float,
        lock_ttl: float,
        fingerprint: Callable[..., bytes] | None,
        on_conflict: Literal["reject", "wait"],
        wait_timeout: float,
        scope: str,
        encode: Callable[[Any], bytes],
        decode: Callable[[bytes], Any],
        complete_retry: float,
    ) -> None:
        self.function = function
        self.store = store
        self.key = key
        self.ttl = ttl
        self.lock_ttl = lock_ttl
        self.fingerprint = fingerprint
        self.on_conflict = on_conflict
        self.wait_timeout = wait_timeout
        self.scope = scope
        self.encode = encode
        self.decode = decode
        self.complete_retry = complete_retry
        self.pending = PendingWrites()  # value writes (and releases) the store failed to take, being retried

    def call_key(self, *args: Any, **kwargs: Any) -> str:
        key = self.key(*args, **kwargs)
        if not isinstance(key, str):
            raise ValueError(f"the key function must return a string, not {key!r}")
        try:
            return check_key(key)
        except InvalidKey as exc:
            raise InvalidKey(f"invalid idempotency key {key[:300]!r}: {exc}") from None

    def call_fingerprint(self, *args: Any, **kwargs: Any) -> bytes:
        if self.fingerprint is None:
            return NO_FINGERPRINT
        data = self.fingerprint(*args, **kwargs)
        if not isinstance(data, bytes):
            raise TypeError(f"the fingerprint function must return bytes, not {type(data).__name__}")
        return hashlib.blake2b(data, digest_size=16).digest()

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        key = self.call_key(*args, **kwargs)
        fingerprint = self.call_fingerprint(*args, **kwargs)
        store_key = record_key(self.store.prefix, self.scope, key)
        looked_at = time.monotonic()
        try:
            claim = await self.store.begin(store_key, fingerprint, self.lock_ttl)
            if self.on_conflict == "wait" and not claim.acquired and claim.record.response is None:
                claim = await self.wait(key, store_key, fingerprint, claim, looked_at)
        except StoreUnavailable:
            FUNCTION_OUTCOME["store_error"].inc()
            raise
        if claim.acquired:
            return await self.run(key, store_key, claim, args, kwargs)
        if claim.record.fingerprint != fingerprint:
            FUNCTION_OUTCOME["mismatch"].inc()
            raise KeyReused(key)
        response = claim.record.response
        if response is None:
            FUNCTION_OUTCOME["conflict"].inc()
            raise KeyInProgress(key)
        FUNCTION_OUTCOME["replayed"].inc()
        return self.decode(response.body)

    async def wait(self, key: str, store_key: str, fingerprint: bytes, claim: Claim, looked_at: float) -> Claim:
        """``on_conflict="wait"``: the first call's value, its release (we take over), or the timeout."""
        if claim.record.fingerprint != fingerprint:
            return claim  # a mismatch: no point in waiting

        def begin() -> Awaitable[Claim]:
            return self.store.begin(store_key, fingerprint, self.lock_ttl)

        waited = await wait_for_outcome(self.store, store_key, claim, looked_at, self.wait_timeout, begin)
        return claim if waited is None else waited

    async def run(self, key: str, store_key: str, claim: Claim, args: Any, kwargs: Any) -> Any:
        """Run the function under our claim, then store its value (or release the key)."""
        assert claim.token is not None
        lease = Lease(self.store, store_key, claim.token, self.lock_ttl, key_hint(key))
        lease.start()
        try:
            value = await self.function(*args, **kwargs)
        except BaseException:
            lease.stop()
            await self.release(lease)
            raise
        lease.stop()
        try:
            body = self.encode(value)
            if not isinstance(body, bytes):
                raise TypeError(f"encode must return bytes, not {type(body).__name__}")
        except Exception as exc:
            await self.release(lease)
            raise TypeError(f"the return value of {self.function.__qualname__} cannot be encoded: {exc}") from exc
        record = Record(claim.record.fingerprint, claim.record.created_at, StoredResponse(VALUE_STATUS, (), body))
        try:
            stored = await self.store.complete(store_key, claim.token, record, self.ttl)
        except StoreUnavailable as exc:
            self.retry_later(lease, record, exc)  # the caller has its value now; the write goes on
            return value
        completion_counted(stored, lease.key_hint, FUNCTION_OUTCOME)
        return value

    async def release(self, lease: Lease) -> None:
        FUNCTION_OUTCOME["released"].inc()
        try:
            await self.store.release(lease.key, lease.token)
        except StoreUnavailable as exc:
            self.retry_later(lease, None, exc)

    def retry_later(self, lease: Lease, record: Record | None, error: StoreUnavailable) -> None:
        """The store failed to take the value (``record``) or the release: keep it and retry it (SPEC §3.8)."""
        write = PendingWrite(
            self.store,
            lease.key,
            lease.token,
            record,
            config=self,
            leased_at=lease.confirmed_at,
            key_hint=lease.key_hint,
            error=error,
            outcomes=FUNCTION_OUTCOME,
        )
        self.pending.add(write)
