"""The message API behind ``asgi-idempotency-header`` (PyPI), with its Redis backend.

Its ``RedisBackend`` imports ``fastapi.responses`` although the package does not declare
FastAPI as a dependency, so FastAPI must be installed (benchmarks/requirements.txt).
"""

from __future__ import annotations

from idempotency_header_middleware import IdempotencyHeaderMiddleware
from idempotency_header_middleware.backends import RedisBackend
from redis.asyncio import Redis
from starlette.middleware import Middleware

from benchmarks.apps.common import create_app, redis_url

backend = RedisBackend(redis=Redis.from_url(redis_url()))
# Its dataclass __call__ is annotated as returning a response, which Starlette's middleware typing rejects.
app = create_app([Middleware(IdempotencyHeaderMiddleware, backend=backend)])  # type: ignore[arg-type]
