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
    store down after running   the value is returned, not stored (counted, logged): a later call runs again
    lease lost while running   the completion is refused by the owner token (counted, logged); the value is returned
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, ParamSpec, TypeVar, cast

import msgpack

from relay_idem.exceptions import KeyInProgress, KeyReused, StoreUnavailable
from relay_idem.keys import InvalidKey, check_key, key_hint, record_key
from relay_idem.lease import Lease, wait_for_outcome
from relay_idem.metrics import FUNCTION_OUTCOME, LEASE_LOST
from relay_idem.store.base import Claim, Record, Store, StoredResponse

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

FUNCTION_SCOPE = "functions"
# A function's value is a completed record with this status and no headers.
VALUE_STATUS = 200
NO_FINGERPRINT = b""


def encode_value(value: Any) -> bytes:
    """msgpack: None, bool, int, float, str, bytes, and lists and dicts of those."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def decode_value(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")


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
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Run the decorated ``async def`` once per key; every later call gets its stored value.

    ``key`` takes the function's arguments and returns the key (1-255 visible ASCII characters);
    ``fingerprint`` too, returning bytes: the same key with another fingerprint raises
    :class:`~relay_idem.KeyReused`. See SPEC §8.4 and this module's docstring for every outcome.
    """
    if on_conflict not in ("reject", "wait"):
        raise ValueError(f"on_conflict must be 'reject' or 'wait', not {on_conflict!r}")
    for name, value in (("ttl", ttl), ("lock_ttl", lock_ttl), ("wait_timeout", wait_timeout)):
        _check_positive(name, value)
    if not isinstance(scope, str) or not scope:
        raise ValueError(f"scope must be a non-empty string, not {scope!r}")

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
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
        )

        @functools.wraps(function)
        async def call_once(*args: P.args, **kwargs: P.kwargs) -> R:
            return cast(R, await runner.call(*args, **kwargs))

        return call_once

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
            await self.release(store_key, claim.token, key)
            raise
        lease.stop()
        try:
            body = self.encode(value)
            if not isinstance(body, bytes):
                raise TypeError(f"encode must return bytes, not {type(body).__name__}")
        except Exception as exc:
            await self.release(store_key, claim.token, key)
            raise TypeError(f"the return value of {self.function.__qualname__} cannot be encoded: {exc}") from exc
        record = Record(claim.record.fingerprint, claim.record.created_at, StoredResponse(VALUE_STATUS, (), body))
        try:
            stored = await self.store.complete(store_key, claim.token, record, self.ttl)
        except StoreUnavailable as exc:
            FUNCTION_OUTCOME["not_stored"].inc()
            logger.warning("relay-idem: could not store a function's value (%s); a later call runs again", exc)
            return value
        if stored:
            FUNCTION_OUTCOME["executed"].inc()
        else:
            FUNCTION_OUTCOME["not_stored"].inc()
            LEASE_LOST.inc()
            logger.warning(
                "relay-idem: lease lost; a newer call holds the key, value not stored (key %s…)", key_hint(key)
            )
        return value

    async def release(self, store_key: str, token: str, key: str) -> None:
        FUNCTION_OUTCOME["released"].inc()
        try:
            await self.store.release(store_key, token)
        except StoreUnavailable as exc:
            logger.warning("relay-idem: could not release a function's key (%s); it frees itself after lock_ttl", exc)
