"""A message-sending app with relay-idem on RedisStore, for tests that serve it with uvicorn workers.

Configured by environment (uvicorn imports it by name in every worker):
``SERVED_REDIS_URL``, ``SERVED_PREFIX``, ``SERVED_ON_CONFLICT`` and ``SERVED_WORK_SECONDS``. Each
execution increments ``<prefix>:executions:<key>`` in Redis, so a test counts real executions
across processes; every response names the worker that answered in ``x-worker-pid``.
"""

from __future__ import annotations

import asyncio
import os
import uuid

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay_idem import IdempotencyMiddleware, RedisStore

REDIS_URL = os.environ.get("SERVED_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("SERVED_PREFIX", "served")
WORK_SECONDS = float(os.environ.get("SERVED_WORK_SECONDS", "0.05"))
counter = Redis.from_url(REDIS_URL)


async def send_message(request: Request) -> Response:
    key = request.headers.get("idempotency-key", "none")
    await counter.incr(f"{PREFIX}:executions:{key}")
    await asyncio.sleep(WORK_SECONDS)
    payload = await request.json()
    return JSONResponse({"id": f"msg_{uuid.uuid4().hex}", "to": payload["to"], "status": "queued"}, status_code=202)


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


class WorkerPidMiddleware:
    """Marks every response with the worker process that answered, so a test can see both served."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-worker-pid", self.pid)]
            await send(message)

        await self.app(scope, receive, send_with_pid)


app = Starlette(routes=[Route("/v1/messages", send_message, methods=["POST"]), Route("/health", health)])
app.add_middleware(
    IdempotencyMiddleware,
    store=RedisStore.from_url(REDIS_URL, prefix=PREFIX),
    on_conflict=os.environ.get("SERVED_ON_CONFLICT", "reject"),
    wait_timeout=10.0,
)
app.add_middleware(WorkerPidMiddleware)
