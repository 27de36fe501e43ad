"""How soon a waiting repeat gets its replay once the first request is done (SPEC §6a: within 50 ms).

In-process, on the harness's Redis: ``IdempotencyMiddleware(on_conflict="wait")`` with a
``RedisStore``, called directly as an ASGI app (no HTTP server). Each trial holds a first request in
the app, parks ``WAITERS`` repeats of its key (waiting on the store's notification, polling every
0.5 s as in production), then lets the app answer; a waiter's latency runs from the app's last
``send`` to the waiter's own last ``send``. The tests prove the wake comes from the notification;
this measures how long it takes.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from typing import Any

from relay_idem import IdempotencyMiddleware, RedisStore

WAITERS = 3
BOUND_MS = 50.0  # SPEC §6a
HANG_GUARD = 10.0
BODY = b'{"id": "msg_1", "status": "queued"}'
Message = dict[str, Any]


class _HeldApp:
    """Answers 202 once ``gate`` is set, noting when its last message went out."""

    def __init__(self) -> None:
        self.gate, self.started = asyncio.Event(), asyncio.Event()
        self.answered_at = 0.0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.started.set()
        await self.gate.wait()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
        await send({"type": "http.response.start", "status": 202, "headers": headers})
        self.answered_at = time.monotonic()
        await send({"type": "http.response.body", "body": BODY})


async def _request(middleware: IdempotencyMiddleware, key: str) -> tuple[int, float]:
    """(status, when its last message was sent) of one POST with ``key``."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/messages", "raw_path": b"/v1/messages", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"idempotency-key", key.encode())],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    sent = asyncio.Event()
    status, done_at = 0, 0.0
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": b'{"to": "+5511999998888"}', "more_body": False}
        await asyncio.Event().wait()  # the client never goes away
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        nonlocal status, done_at
        if message["type"] == "http.response.start":
            status = message["status"]
        elif not message.get("more_body", False):
            done_at = time.monotonic()
            sent.set()

    await middleware(scope, receive, send)  # type: ignore[arg-type]
    return status, done_at


async def _trial(store: RedisStore) -> list[float]:
    app = _HeldApp()
    middleware = IdempotencyMiddleware(app, store=store, on_conflict="wait", wait_timeout=HANG_GUARD)  # type: ignore[arg-type]
    key = secrets.token_hex(8)
    first = asyncio.create_task(_request(middleware, key))
    await asyncio.wait_for(app.started.wait(), HANG_GUARD)
    repeats = [asyncio.create_task(_request(middleware, key)) for _ in range(WAITERS)]
    deadline = time.monotonic() + HANG_GUARD
    while middleware.waiting < WAITERS:  # every repeat has looked and is waiting
        if time.monotonic() > deadline:
            raise RuntimeError("the repeats did not start waiting")
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    app.gate.set()
    await first
    results = await asyncio.wait_for(asyncio.gather(*repeats), HANG_GUARD)
    if any(status != 202 for status, _ in results):
        raise RuntimeError(f"a waiting repeat got {[status for status, _ in results]}, not the replayed 202")
    return [(done_at - app.answered_at) * 1000 for _, done_at in results]


async def _measure(redis_url: str, trials: int) -> dict[str, Any]:
    store = RedisStore.from_url(redis_url, prefix="bench-wake-" + secrets.token_hex(4))
    try:
        await _trial(store)  # warm-up: scripts loaded, the subscription standing
        samples: list[float] = []
        for _ in range(trials):
            samples += await _trial(store)
    finally:
        await store.close()
    ordered = sorted(samples)
    return {
        "trials": trials,
        "waiters": len(samples),
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max_ms": round(ordered[-1], 3),
        "bound_ms": BOUND_MS,
    }


def measure(redis_url: str, trials: int) -> dict[str, Any]:
    """Latency summary of ``trials`` x WAITERS waiting repeats (milliseconds)."""
    import uvloop

    return uvloop.run(_measure(redis_url, trials))
