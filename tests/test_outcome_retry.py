"""SPEC §3.8: an outcome write the store failed to take is kept and retried, never silently dropped.

The store here is a MemoryStore whose operations fail on demand; tests/test_faults_completion.py
does the same with real Redis processes paused, killed and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from relay_idem import IdempotencyMiddleware
from relay_idem.keys import record_key
from relay_idem.scopes import ANONYMOUS_SCOPE
from relay_idem.store import Claim, Record
from tests.apps import Counter, Statuses, call, idem
from tests.test_middleware_errors import Delta, FailingStore, sample

pytestmark = pytest.mark.anyio

HANG_GUARD = 10.0


class CountingStore(FailingStore):
    """``FailingStore`` that also counts every call of each operation, failed or not."""

    def __init__(self, *failing: str) -> None:
        super().__init__(*failing)
        self.calls: Tally[str] = Tally()

    def check(self, operation: str) -> None:
        self.calls[operation] += 1
        super().check(operation)


async def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {HANG_GUARD} s"
        await asyncio.sleep(0.01)


def pending_gauge() -> float:
    return sample("relay_idem_pending_writes")


def given_up(reason: str) -> float:
    return sample("relay_idem_writes_given_up_total", {"reason": reason})


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


async def test_a_failed_completion_is_retried_and_the_claim_kept_so_a_repeat_never_executes_again() -> None:
    store = CountingStore("complete")
    app = Counter()
    lock_ttl = 0.5
    middleware = IdempotencyMiddleware(app, store=store, lock_ttl=lock_ttl)
    gauge = pending_gauge()
    with Delta() as moved:
        first = await call(middleware, headers=idem("k"))
        assert (first.status, first.body) == (200, b"call 1")  # the response goes out at once
        assert len(middleware.pending) == 1
        assert pending_gauge() == gauge + 1
        # Three leases long, while the store takes no outcome: the claim is renewed, every repeat is a 409.
        repeated_until = time.monotonic() + 3 * lock_ttl
        while time.monotonic() < repeated_until:
            assert (await call(middleware, headers=idem("k"))).status == 409
            await asyncio.sleep(0.05)
        assert store.calls["renew"] >= 3
        assert app.calls == 1
        store.failing.clear()
        await until(lambda: not middleware.pending, "the retried write to land")
    assert pending_gauge() == gauge
    assert moved.moved["executed"] == 1
    assert set(moved.moved) == {"executed", "conflict"}
    replay = await call(middleware, headers=idem("k"))
    assert replay.header(b"idempotent-replayed") == b"true"
    assert replay.body == b"call 1"
    assert app.calls == 1


async def test_a_waiting_repeat_gets_the_replay_once_the_retried_write_lands() -> None:
    store = FailingStore("complete")
    app = Counter()
    middleware = IdempotencyMiddleware(app, store=store, on_conflict="wait", wait_timeout=HANG_GUARD)
    assert (await call(middleware, headers=idem("k"))).body == b"call 1"
    repeat = asyncio.create_task(call(middleware, headers=idem("k")))
    await until(lambda: middleware.waiting == 1, "the repeat to wait")
    store.failing.clear()
    result = await asyncio.wait_for(repeat, HANG_GUARD)
    assert result.header(b"idempotent-replayed") == b"true"
    assert result.body == b"call 1"
    assert app.calls == 1


async def test_a_write_that_cannot_land_within_complete_retry_is_given_up_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    middleware = IdempotencyMiddleware(Counter(), store=FailingStore("complete"), complete_retry=0.3)
    timeouts = given_up("timeout")
    with caplog.at_level(logging.INFO, logger="relay_idem"), Delta() as moved:
        assert (await call(middleware, headers=idem("k"))).status == 200
        await until(lambda: not middleware.pending, "the write to be given up")
    assert moved.moved == {"not_stored": 1}
    assert given_up("timeout") == timeouts + 1
    assert len(warnings(caplog, "could not store the outcome")) == 1
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


async def test_nothing_is_counted_while_the_write_is_pending() -> None:
    store = FailingStore("complete")
    middleware = IdempotencyMiddleware(Counter(), store=store)
    with Delta() as moved:
        assert (await call(middleware, headers=idem("k"))).status == 200
    assert moved.moved == {}
    store.failing.clear()
    with Delta() as landed:
        await middleware.drain()
    assert landed.moved == {"executed": 1}


async def test_a_newer_owner_refuses_the_late_write_and_it_counts_as_lease_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FailingStore("complete", "renew")
    middleware = IdempotencyMiddleware(Counter(), store=store, lock_ttl=0.1)
    key = record_key(store.prefix, ANONYMOUS_SCOPE, "k")
    lease_lost = sample("relay_idem_lease_lost_total")
    with caplog.at_level(logging.WARNING, logger="relay_idem"), Delta() as moved:
        assert (await call(middleware, headers=idem("k"))).status == 200
        newer: list[Claim] = []

        async def lease_over_and_claimed() -> bool:
            if await store.get(key) is None:
                newer.append(await store.begin(key, b"newer owner", 10))
            return bool(newer)

        deadline = time.monotonic() + HANG_GUARD
        while not await lease_over_and_claimed():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        store.failing.clear()
        await middleware.drain()
    assert moved.moved == {"not_stored": 1}
    assert sample("relay_idem_lease_lost_total") == lease_lost + 1
    assert len(warnings(caplog, "lease lost")) == 1
    info = await store.get(key)
    assert info is not None
    assert (info.record.fingerprint, info.record.response) == (b"newer owner", None)


async def test_a_failed_release_is_retried_so_the_key_is_free_before_its_lease_ends() -> None:
    store = FailingStore("release")
    app = Statuses(503, 200)
    middleware = IdempotencyMiddleware(app, store=store, lock_ttl=60)
    with Delta() as moved:
        assert (await call(middleware, headers=idem("k"))).status == 503
        assert len(middleware.pending) == 1
        assert (await call(middleware, headers=idem("k"))).status == 409  # still claimed
        store.failing.clear()
        await until(lambda: not middleware.pending, "the retried release")
        again = await call(middleware, headers=idem("k"))
    assert (again.status, again.body) == (200, b"call 2: 200")
    assert moved.moved == {"not_stored": 1, "conflict": 1, "executed": 1}


async def test_a_release_stops_being_retried_once_its_lease_is_over(caplog: pytest.LogCaptureFixture) -> None:
    """The key frees itself then: nothing is lost, so nothing is given up."""
    store = FailingStore("release")
    middleware = IdempotencyMiddleware(Statuses(503, 200), store=store, lock_ttl=0.2)
    timeouts = given_up("timeout")
    with caplog.at_level(logging.WARNING, logger="relay_idem"):
        assert (await call(middleware, headers=idem("k"))).status == 503
        await until(lambda: not middleware.pending, "the release to stop")
    assert given_up("timeout") == timeouts
    assert warnings(caplog, "") == []
    assert (await call(middleware, headers=idem("k"))).status == 200


async def test_past_the_cap_the_oldest_pending_write_is_given_up(caplog: pytest.LogCaptureFixture) -> None:
    store = FailingStore("complete")
    middleware = IdempotencyMiddleware(Counter(), store=store)
    middleware.pending.limit = 2
    overflows = given_up("overflow")
    with caplog.at_level(logging.WARNING, logger="relay_idem"), Delta() as moved:
        for key in ("a", "b", "c"):
            assert (await call(middleware, headers=idem(key))).status == 200
        assert len(middleware.pending) == 2
        assert given_up("overflow") == overflows + 1
        store.failing.clear()
        await middleware.drain()
    assert moved.moved == {"not_stored": 1, "executed": 2}
    assert len(warnings(caplog, "too many other writes")) == 1
    for key in ("b", "c"):
        assert (await call(middleware, headers=idem(key))).header(b"idempotent-replayed") == b"true"
    assert (await call(middleware, headers=idem("a"))).status == 409  # given up: its claim just runs out


async def test_past_the_byte_budget_the_oldest_pending_write_is_given_up() -> None:
    store = FailingStore("complete")
    middleware = IdempotencyMiddleware(Counter(), store=store)
    middleware.pending.limit_bytes = 10  # each body here is 6 bytes ("call N")
    overflows = given_up("overflow")
    for key in ("a", "b"):
        assert (await call(middleware, headers=idem(key))).status == 200
    assert len(middleware.pending) == 1
    assert middleware.pending.bytes == 6
    assert given_up("overflow") == overflows + 1
    store.failing.clear()
    await middleware.drain()
    assert middleware.pending.bytes == 0
    assert (await call(middleware, headers=idem("b"))).header(b"idempotent-replayed") == b"true"


async def test_complete_retry_0_gives_up_at_once() -> None:
    middleware = IdempotencyMiddleware(Counter(), store=FailingStore("complete"), complete_retry=0)
    with Delta() as moved:
        assert (await call(middleware, headers=idem("k"))).status == 200
    assert moved.moved == {"not_stored": 1}
    assert not middleware.pending


class Lifespan:
    """Runs an app's ASGI lifespan by hand, as a server does."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.channel: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self.sent: list[str] = []
        self.task: asyncio.Task[None] | None = None

    async def send(self, message: dict[str, str]) -> None:
        self.sent.append(message["type"])

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.channel.get, self.send))
        await self.channel.put({"type": "lifespan.startup"})
        await until(lambda: self.sent == ["lifespan.startup.complete"], "start-up")

    async def shut_down(self, store: CountingStore) -> None:
        """Send the shutdown; once two more writes have failed meanwhile, let the store recover."""
        attempts = store.calls["complete"]
        await self.channel.put({"type": "lifespan.shutdown"})
        await until(lambda: store.calls["complete"] >= attempts + 2, "two more attempts during the shutdown")
        assert self.sent == ["lifespan.startup.complete"]  # still shutting down
        store.failing.clear()
        assert self.task is not None
        await asyncio.wait_for(self.task, HANG_GUARD)
        assert self.sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def stored(store: CountingStore, key: str) -> bool:
    info = await store.get(record_key(store.prefix, ANONYMOUS_SCOPE, key))
    return info is not None and info.record.response is not None


async def test_the_lifespan_shutdown_reaches_the_app_after_the_pending_writes_landed() -> None:
    store = CountingStore("complete")
    app = Counter()
    at_shutdown: list[bool] = []

    async def app_with_lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        at_shutdown.append(await stored(store, "k"))
        await send({"type": "lifespan.shutdown.complete"})

    middleware = IdempotencyMiddleware(app_with_lifespan, store=store)
    lifespan = Lifespan(middleware)
    await lifespan.start()
    assert (await call(middleware, headers=idem("k"))).status == 200
    await lifespan.shut_down(store)
    assert at_shutdown == [True]


async def test_starlette_add_middleware_drains_before_the_apps_own_shutdown() -> None:
    store = CountingStore("complete")
    at_shutdown: list[bool] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        at_shutdown.append(await stored(store, "k"))

    async def send_message(request: Request) -> PlainTextResponse:
        return PlainTextResponse("queued", status_code=202)

    app = Starlette(routes=[Route("/", send_message, methods=["POST"])], lifespan=lifespan)
    app.add_middleware(IdempotencyMiddleware, store=store)
    running = Lifespan(app)
    await running.start()
    assert (await call(app, headers=idem("k"))).status == 202
    await running.shut_down(store)
    assert at_shutdown == [True]


async def test_litestar_drains_with_drain_all_on_shutdown() -> None:
    """Litestar keeps the lifespan from its (per-route) middleware: ``on_shutdown`` drains them all."""
    from litestar import Litestar, post
    from litestar.middleware import DefineMiddleware

    store = CountingStore("complete")
    at_shutdown: list[bool] = []

    async def record() -> None:
        at_shutdown.append(await stored(store, "k"))

    @post("/", status_code=202)
    async def send_message() -> str:
        return "queued"

    app = Litestar(
        route_handlers=[send_message],
        middleware=[DefineMiddleware(IdempotencyMiddleware, store=store)],
        on_shutdown=[IdempotencyMiddleware.drain_all, record],
    )
    running = Lifespan(app)
    await running.start()
    assert (await call(app, headers=idem("k"))).status == 202
    await running.shut_down(store)
    assert at_shutdown == [True]


async def test_a_write_retried_after_it_had_landed_counts_as_stored_not_as_lease_lost() -> None:
    """The store took the write but its answer was lost (a timeout): the retry finds this very record."""

    class LostReply(FailingStore):
        async def complete(self, key: str, token: str, record: Record, ttl: float) -> bool:
            stored = await super(FailingStore, self).complete(key, token, record, ttl)
            self.check("complete")
            return stored

    store = LostReply("complete")
    middleware = IdempotencyMiddleware(Counter(), store=store)
    lease_lost = sample("relay_idem_lease_lost_total")
    with Delta() as moved:
        assert (await call(middleware, headers=idem("k"))).status == 200
        store.failing.clear()
        await middleware.drain()
    assert moved.moved == {"executed": 1}
    assert sample("relay_idem_lease_lost_total") == lease_lost
