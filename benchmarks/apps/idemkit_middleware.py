"""The message API behind ``idemkit`` (PyPI), with its ``RedisBackend`` on the same Redis.

Configured as its README's production example, minus the tenant scope (one tenant here:
``scope_mode="single_tenant"`` only silences the warning about it). Duplicates in flight wait for
the first request and replay it (its default), instead of getting 409.
"""

from __future__ import annotations

from idemkit import HttpConfig, IdempotencyMiddleware, RedisBackend
from starlette.middleware import Middleware

from benchmarks.apps.common import create_app, redis_url

backend = RedisBackend.from_url(redis_url())
app = create_app([Middleware(IdempotencyMiddleware, backend=backend, config=HttpConfig(scope_mode="single_tenant"))])
