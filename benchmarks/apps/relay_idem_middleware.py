"""The message API behind relay-idem's own middleware, storing records in ``BENCH_REDIS_URL``."""

from __future__ import annotations

from benchmarks.apps.common import create_app, redis_url
from relay_idem import IdempotencyMiddleware, RedisStore

app = create_app()
app.add_middleware(IdempotencyMiddleware, store=RedisStore.from_url(redis_url()))
