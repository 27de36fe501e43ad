"""One record, as an operator sees it: ``relay-idem inspect`` and ``relay-idem purge``."""

from __future__ import annotations

import time

from relay_idem.config import open_store
from relay_idem.keys import record_key
from relay_idem.scopes import ANONYMOUS_SCOPE, credential_scope
from relay_idem.store.base import RecordInfo


def tenant_scope(authorization: str | None, scope: str | None) -> str:
    """The scope id the middleware computes: from an ``Authorization`` value, given raw, or anonymous."""
    if scope is not None:
        return scope
    if authorization is not None:
        return credential_scope("authorization", authorization.encode())
    return ANONYMOUS_SCOPE


async def find(redis: str, prefix: str, scope: str, key: str) -> tuple[RecordInfo | None, str]:
    """The record of ``key`` under ``scope`` (or None), and the Redis key it lives under."""
    store = open_store(redis, prefix=prefix)
    store_key = record_key(store.prefix, scope, key)
    try:
        return await store.get(store_key), store_key
    finally:
        await store.close()


async def remove(redis: str, prefix: str, scope: str, key: str) -> bool:
    store = open_store(redis, prefix=prefix)
    try:
        return await store.delete(record_key(store.prefix, scope, key))
    finally:
        await store.close()


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def describe(key: str, scope: str, store_key: str, info: RecordInfo, *, now: float | None = None) -> str:
    """A few aligned ``name  value`` lines a person can read."""
    record = info.record
    response = record.response
    age = (time.time() if now is None else now) - record.created_at
    rows = [
        ("key", key),
        ("scope", scope),
        ("redis key", store_key),
        ("state", "in_progress" if response is None else "completed"),
        ("age", _seconds(max(age, 0.0))),
        ("ttl", "none" if info.ttl is None else _seconds(info.ttl)),
    ]
    if response is None:
        rows.append(("status", "- (the first request is still running)"))
    else:
        rows.append(("status", str(response.status)))
        if response.body_omitted:
            rows.append(("body", "not retained (over max_response_bytes, or the response broke off)"))
        else:
            rows.append(("body", f"{len(response.body)} bytes"))
        rows.append(("headers", str(len(response.headers))))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
