"""The benchmark's message API and the environment it is configured by.

``POST /v1/messages`` -> 202 ``{"id": "msg_…", "status": "queued", "queuedAt": iso}``,
``GET /v1/stats`` -> ``{"dispatched": N}`` — the same shapes as the demo API (SPEC.md §2).

Environment:

- ``BENCH_REDIS_URL``: the Redis a middleware stores its records in.
- ``BENCH_COUNT_URL``: when set, every execution of ``POST /v1/messages`` also does
  ``HINCRBY bench:executions <Idempotency-Key> 1`` there, so duplicate executions are
  counted outside the app process (used by the conflict-storm scenarios only, because
  it costs a Redis round trip).
- ``BENCH_APP_DELAY_MS``: simulated work per message (``asyncio.sleep``), 0 by default.
- ``BENCH_UPSTREAM_URL``: where the proxy-group app (asgiproxy) forwards to.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

REDIS_URL_ENV = "BENCH_REDIS_URL"
COUNT_URL_ENV = "BENCH_COUNT_URL"
DELAY_ENV = "BENCH_APP_DELAY_MS"
UPSTREAM_URL_ENV = "BENCH_UPSTREAM_URL"
EXECUTIONS_HASH = "bench:executions"
NO_KEY = "-"


def redis_url() -> str:
    """The Redis URL a middleware should use (``BENCH_REDIS_URL``)."""
    return os.environ.get(REDIS_URL_ENV, "redis://127.0.0.1:6379/0")


def create_app(middleware: Sequence[Middleware] = ()) -> Starlette:
    """Build the message API, wrapped in ``middleware`` (outermost first)."""
    count_url = os.environ.get(COUNT_URL_ENV)
    delay = float(os.environ.get(DELAY_ENV, "0")) / 1000.0
    state = {"dispatched": 0}
    counter: Redis | None = None

    async def send_message(request: Request) -> Response:
        try:
            payload = json.loads(await request.body())
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or "to" not in payload or "template" not in payload:
            return JSONResponse(
                {"type": "about:blank", "title": "Bad Request", "status": 400, "detail": "need to and template"},
                status_code=400,
                media_type="application/problem+json",
            )
        if delay:
            await asyncio.sleep(delay)
        state["dispatched"] += 1
        if counter is not None:
            await counter.hincrby(EXECUTIONS_HASH, request.headers.get("idempotency-key", NO_KEY), 1)
        message = {
            "id": "msg_" + secrets.token_hex(8),
            "status": "queued",
            "queuedAt": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        return JSONResponse(message, status_code=202)

    async def stats(request: Request) -> Response:
        return JSONResponse({"dispatched": state["dispatched"]})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal counter
        if count_url:
            counter = Redis.from_url(count_url)
        try:
            yield
        finally:
            if counter is not None:
                await counter.aclose()

    routes = [Route("/v1/messages", send_message, methods=["POST"]), Route("/v1/stats", stats, methods=["GET"])]
    return Starlette(routes=routes, middleware=list(middleware), lifespan=lifespan)
