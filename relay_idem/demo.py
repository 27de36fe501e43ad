"""The demo message API (``relay-idem demo``, SPEC §2): a WhatsApp-style relay that queues messages.

``POST /v1/messages`` queues a message, ``GET /v1/messages/{id}`` shows it, ``GET /v1/stats`` says
how many messages were really created, so anyone can see that a retried request created nothing
new. The middleware is mounted with ``require_key`` on ``/v1/messages``; ``--bare`` leaves it out.
With ``--redis``, records, messages and the count live in Redis and are shared by every demo
process on it; without, they live in the process.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from relay_idem.config import DEFAULT_PREFIX, open_store
from relay_idem.middleware import IdempotencyMiddleware
from relay_idem.problems import Problem, problem_body
from relay_idem.store.redis_store import RedisClient, client_from_url

INVALID_JSON = Problem("demo/invalid-json", 400, "The body is not JSON")
INVALID_MESSAGE = Problem("demo/invalid-message", 400, "Invalid message")
MESSAGE_NOT_FOUND = Problem("demo/message-not-found", 404, "No such message")
REQUIRE_KEY = ("/v1/messages*",)
# Messages kept in Redis expire like the records that protect them (the middleware's default ttl).
MESSAGE_TTL_SECONDS = 86_400


class Messages(Protocol):
    """Where the demo keeps its messages and the count of messages created."""

    async def add(self, message: dict[str, Any]) -> None: ...

    async def get(self, message_id: str) -> dict[str, Any] | None: ...

    async def dispatched(self) -> int: ...

    async def close(self) -> None: ...


class MemoryMessages:
    def __init__(self) -> None:
        self.messages: dict[str, dict[str, Any]] = {}
        self.count = 0

    async def add(self, message: dict[str, Any]) -> None:
        self.messages[message["id"]] = message
        self.count += 1

    async def get(self, message_id: str) -> dict[str, Any] | None:
        return self.messages.get(message_id)

    async def dispatched(self) -> int:
        return self.count

    async def close(self) -> None:
        return None


class RedisMessages:
    """Messages under ``<prefix>:demo:message:<id>``, the count under ``<prefix>:demo:dispatched``."""

    def __init__(self, redis: RedisClient, prefix: str) -> None:
        self.redis = redis
        self.prefix = f"{prefix}:demo"

    async def add(self, message: dict[str, Any]) -> None:
        # Two commands, no MULTI: the keys may sit on different Cluster slots.
        await self.redis.set(f"{self.prefix}:message:{message['id']}", json.dumps(message), ex=MESSAGE_TTL_SECONDS)
        await self.redis.incr(f"{self.prefix}:dispatched")

    async def get(self, message_id: str) -> dict[str, Any] | None:
        data = await self.redis.get(f"{self.prefix}:message:{message_id}")
        return None if data is None else dict(json.loads(data))

    async def dispatched(self) -> int:
        return int(await self.redis.get(f"{self.prefix}:dispatched") or 0)

    async def close(self) -> None:
        await self.redis.aclose()


def problem(problem: Problem, detail: str) -> Response:
    body = problem_body(problem, detail)
    return Response(body, problem.status, headers={"content-type": "application/problem+json"})


def queued_at() -> str:
    """Now, in ISO 8601 UTC with milliseconds: ``2026-11-27T19:54:30.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def load_json(body: bytes) -> Any:
    """``body`` parsed, if the demo can also send it back as JSON: else ``ValueError``.

    Besides invalid JSON that means: nesting deeper than the parser's recursion (``[`` x 5,000 was a
    500, replayed for the key: issue 12), numbers out of float range (``1e999``), ``NaN`` and
    ``Infinity``, and lone surrogates (``"\\ud800"``), which have no UTF-8 form.
    """
    try:
        payload = json.loads(body, parse_float=_finite, parse_constant=_no_constant)
        json.dumps(payload, ensure_ascii=False).encode()
    except RecursionError as exc:
        raise ValueError("nested too deep") from exc
    return payload


def parse_message(body: bytes) -> dict[str, Any] | Response:
    """The message to queue, or the 400 problem that says what is wrong with it."""
    try:
        payload = load_json(body)
    except ValueError:
        return problem(INVALID_JSON, 'send a JSON object such as {"to": "+5511999998888", "template": "..."}')
    if not isinstance(payload, dict):
        return problem(INVALID_MESSAGE, "the body must be a JSON object")
    missing = [name for name in ("to", "template") if not isinstance(payload.get(name), str) or not payload[name]]
    if missing:
        return problem(INVALID_MESSAGE, f"missing or empty: {', '.join(missing)} (non-empty strings)")
    return {
        "id": f"msg_{secrets.token_hex(12)}",
        "to": payload["to"],
        "template": payload["template"],
        "language": payload.get("language"),
        "variables": payload.get("variables") or {},
        "status": "queued",
        "queuedAt": queued_at(),
    }


def build_demo_app(*, redis: str | None = None, prefix: str = DEFAULT_PREFIX, bare: bool = False) -> ASGIApp:
    """The demo API; with ``bare`` it runs without the middleware."""
    messages: Messages = MemoryMessages() if redis is None else RedisMessages(client_from_url(redis), prefix)

    async def create_message(request: Request) -> Response:
        message = parse_message(await request.body())
        if isinstance(message, Response):
            return message
        await messages.add(message)
        summary = {"id": message["id"], "status": message["status"], "queuedAt": message["queuedAt"]}
        return JSONResponse(summary, status_code=202, headers={"location": f"/v1/messages/{message['id']}"})

    async def show_message(request: Request) -> Response:
        message = await messages.get(request.path_params["message_id"])
        if message is None:
            return problem(MESSAGE_NOT_FOUND, f"no message {request.path_params['message_id']!r}")
        return JSONResponse(message)

    async def stats(request: Request) -> Response:
        return JSONResponse({"dispatched": await messages.dispatched()})

    async def index(request: Request) -> Response:
        return JSONResponse(
            {
                "service": "relay-idem demo message API",
                "idempotency": "off (--bare)" if bare else "on: POST /v1/messages requires an Idempotency-Key",
                "endpoints": ["POST /v1/messages", "GET /v1/messages/{id}", "GET /v1/stats"],
            }
        )

    store = None if bare else open_store(redis, prefix=prefix)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await messages.close()
        if store is not None:
            await store.close()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/v1/messages", create_message, methods=["POST"]),
            Route("/v1/messages/{message_id}", show_message),
            Route("/v1/stats", stats),
        ],
        lifespan=lifespan,
    )
    if store is None:
        return app
    return IdempotencyMiddleware(app, store, require_key=REQUIRE_KEY)
