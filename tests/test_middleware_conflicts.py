"""SPEC §3.4 and §3.5 through the middleware: a repeat while the first runs, and a key reused for another request."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from relay_idem import IdempotencyMiddleware, MemoryStore, Store
from relay_idem.fingerprint import request_fingerprint
from relay_idem.keys import record_key
from relay_idem.scopes import ANONYMOUS_SCOPE
from relay_idem.store import Claim
from tests.apps import (
    HANG_GUARD,
    LONG_WAIT,
    Counter,
    Echo,
    Message,
    Result,
    Slow,
    Statuses,
    call,
    client,
    idem,
    make_scope,
)
from tests.relay_processes import wait_for

pytestmark = pytest.mark.anyio


def problem_type(result: Result) -> str:
    assert result.header(b"content-type") == b"application/problem+json"
    kind: str = json.loads(result.body)["type"]
    return kind


def retry_after(result: Result) -> int:
    value = result.header(b"retry-after")
    assert value is not None
    assert value.isdigit()
    return int(value)


def fingerprint_of(**request: Any) -> bytes:
    """The default fingerprint of a request built by ``make_scope(**request)`` with an empty body."""
    return request_fingerprint(make_scope(**request), b"")


async def start_first(middleware: IdempotencyMiddleware, app: Slow | Statuses, key: str = "k") -> asyncio.Task[Result]:
    """Start a request and return once the app is running it."""
    task = asyncio.create_task(call(middleware, headers=idem(key)))
    await asyncio.wait_for(app.started.wait(), 2.0)
    return task


# --- §3.4 a repeat while the first is running -------------------------------------------------------


async def test_reject_mode_repeat_while_running_is_409_with_retry_after(store: Store) -> None:
    gate = asyncio.Event()
    app = Slow(gate)
    middleware = IdempotencyMiddleware(app, store=store)
    first = await start_first(middleware, app)
    repeat = await call(middleware, headers=idem("k"))
    assert repeat.status == 409
    assert problem_type(repeat).endswith("/key-in-progress")
    assert retry_after(repeat) >= 1
    gate.set()
    assert (await first).status == 200
    replay = await call(middleware, headers=idem("k"))
    assert replay.body == b"call 1"
    assert replay.header(b"idempotent-replayed") == b"true"
    assert app.calls == 1


async def until(predicate: Callable[[], bool], what: str) -> None:
    async def check() -> bool:
        return predicate()

    await wait_for(check, timeout=5.0, what=what, interval=0.01)


class CountingStore:
    """``store`` with its ``begin`` and ``wait`` calls counted: the store commands a request sent."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.begins = 0
        self.waits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def begin(self, key: str, fingerprint: bytes, lock_ttl: float) -> Claim:
        self.begins += 1
        return await self.store.begin(key, fingerprint, lock_ttl)

    async def wait(self, key: str, since: float, timeout: float) -> None:
        self.waits += 1
        await self.store.wait(key, since, timeout)


async def test_wait_mode_repeats_are_woken_by_the_completion_and_get_the_replay(store: Store, no_polling: None) -> None:
    # SPEC §3.4/§6a: woken by the completion, not by looking again (the 50 ms figure is the benchmark's).
    # With polling out of the way and a wait_timeout of LONG_WAIT, only the completion's notification
    # can end the repeats' waits before then; each repeat looks at the store twice: on arrival, and once
    # after the wake.
    gate = asyncio.Event()
    app = Slow(gate)
    # A store that wakes waiters by subscription subscribes first (a waiter that comes before the
    # subscription stands looks at its key again once it does).
    await store.wait(f"{store.prefix}:warm-up", time.monotonic(), HANG_GUARD)
    counting = CountingStore(store)
    middleware = IdempotencyMiddleware(app, store=counting, on_conflict="wait", wait_timeout=LONG_WAIT)
    first = asyncio.create_task(call(middleware, headers=idem("k")))
    await asyncio.wait_for(app.started.wait(), HANG_GUARD)
    repeats = [asyncio.create_task(call(middleware, headers=idem("k"))) for _ in range(3)]
    await until(lambda: counting.waits == len(repeats), "every repeat to look and park, waiting")
    assert counting.begins == 1 + len(repeats)
    assert not any(repeat.done() for repeat in repeats)
    gate.set()
    first_result = await first
    results = await asyncio.wait_for(asyncio.gather(*repeats), HANG_GUARD)
    for result in results:
        assert result.status == 200
        assert result.body == first_result.body == b"call 1"
        assert result.header(b"idempotent-replayed") == b"true"
    assert counting.begins == 1 + 2 * len(repeats)
    assert app.calls == 1


async def test_wait_mode_repeat_past_wait_timeout_is_409(store: Store) -> None:
    gate = asyncio.Event()
    app = Slow(gate)
    middleware = IdempotencyMiddleware(app, store=store, on_conflict="wait", wait_timeout=0.3)
    first = await start_first(middleware, app)
    started = time.monotonic()
    repeat = await asyncio.wait_for(call(middleware, headers=idem("k")), HANG_GUARD)
    elapsed = time.monotonic() - started
    gate.set()
    await first
    assert repeat.status == 409
    assert problem_type(repeat).endswith("/key-in-progress")
    assert retry_after(repeat) >= 1
    assert elapsed >= 0.3
    assert app.calls == 1


async def test_wait_mode_over_max_waiters_is_409_at_once() -> None:
    # "At once": without waiting at all. With a wait_timeout of LONG_WAIT, a request that waited would
    # not be answered within HANG_GUARD, and the store saw no third wait.
    gate = asyncio.Event()
    app = Slow(gate)
    counting = CountingStore(MemoryStore())
    middleware = IdempotencyMiddleware(app, store=counting, on_conflict="wait", wait_timeout=LONG_WAIT, max_waiters=2)
    first = await start_first(middleware, app)
    waiting = [asyncio.create_task(call(middleware, headers=idem("k"))) for _ in range(2)]
    await until(lambda: counting.waits == len(waiting), "both waiters to park")
    over = await asyncio.wait_for(call(middleware, headers=idem("k")), HANG_GUARD)
    assert over.status == 409
    assert problem_type(over).endswith("/key-in-progress")
    assert retry_after(over) >= 1
    assert counting.waits == len(waiting)
    gate.set()
    await first
    assert [(await task).status for task in waiting] == [200, 200]
    assert middleware.waiting == 0
    assert app.calls == 1


async def test_a_waiter_whose_client_disconnects_frees_its_max_waiters_slot_at_once(store: Store) -> None:
    """Issue 12: the slot was held until the first request finished or wait_timeout ended."""
    gate = asyncio.Event()
    app = Slow(gate)
    middleware = IdempotencyMiddleware(app, store=store, on_conflict="wait", wait_timeout=30, max_waiters=1)
    first = await start_first(middleware, app)
    hang_up = asyncio.Event()
    sent: list[Message] = []
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    gone = asyncio.create_task(middleware(make_scope(headers=idem("k")), receive, send))
    await until(lambda: middleware.waiting == 1, "the repeat to wait")
    hang_up.set()
    await asyncio.wait_for(gone, 5.0)  # returns at once, the first request still running
    assert not first.done()
    assert middleware.waiting == 0
    assert sent == []  # nobody to answer
    second = asyncio.create_task(call(middleware, headers=idem("k")))
    await until(lambda: middleware.waiting == 1, "a second repeat to take the freed slot")
    gate.set()
    assert (await first).status == 200
    replay = await asyncio.wait_for(second, 5.0)
    assert replay.status == 200
    assert replay.header(b"idempotent-replayed") == b"true"
    assert app.calls == 1


async def test_wait_mode_with_max_waiters_0_rejects_every_repeat() -> None:
    gate = asyncio.Event()
    app = Slow(gate)
    middleware = IdempotencyMiddleware(app, on_conflict="wait", wait_timeout=5, max_waiters=0)
    first = await start_first(middleware, app)
    assert (await call(middleware, headers=idem("k"))).status == 409
    gate.set()
    await first


async def test_wait_mode_released_first_request_lets_one_waiter_take_over_and_execute(store: Store) -> None:
    gate = asyncio.Event()
    app = Statuses(503, 201, gate=gate)
    middleware = IdempotencyMiddleware(app, store=store, on_conflict="wait", wait_timeout=5)
    first = await start_first(middleware, app)
    waiters = [asyncio.create_task(call(middleware, headers=idem("k"))) for _ in range(3)]
    await asyncio.sleep(0.15)
    gate.set()
    assert (await first).status == 503
    results = [await asyncio.wait_for(waiter, 2.0) for waiter in waiters]
    assert app.calls == 2  # the first, and exactly one waiter that took over
    assert [result.status for result in results] == [201, 201, 201]
    assert {result.body for result in results} == {b"call 2: 201"}
    replayed = [result.header(b"idempotent-replayed") for result in results]
    assert sorted(replayed, key=lambda value: value or b"") == [None, b"true", b"true"]


async def test_wait_mode_waiter_takes_over_a_claim_whose_owner_vanished(store: Store) -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, store=store, on_conflict="wait", wait_timeout=3)
    key = record_key(store.prefix, ANONYMOUS_SCOPE, "k")
    # A process that died holding the claim: never completed nor released.
    abandoned = await store.begin(key, fingerprint_of(headers=idem("k")), 0.2)
    assert abandoned.acquired
    started = time.monotonic()
    result = await call(middleware, headers=idem("k"))
    assert result.status == 200
    assert result.body == b"call 1"
    assert time.monotonic() - started < 1.5
    assert app.calls == 1


async def test_reject_mode_after_an_expired_claim_executes() -> None:
    store = MemoryStore()
    app = Counter()
    middleware = IdempotencyMiddleware(app, store=store)
    await store.begin(record_key(store.prefix, ANONYMOUS_SCOPE, "k"), fingerprint_of(headers=idem("k")), 0.05)
    assert (await call(middleware, headers=idem("k"))).status == 409
    await asyncio.sleep(0.1)
    assert (await call(middleware, headers=idem("k"))).body == b"call 1"


async def test_many_concurrent_repeats_execute_once_in_both_modes() -> None:
    for mode in ("reject", "wait"):
        app = Slow(delay=0.05)
        middleware = IdempotencyMiddleware(app, on_conflict=mode)
        async with client(middleware) as http:
            responses = await asyncio.gather(
                *(http.post("/", headers={"Idempotency-Key": "k"}, content=b"same") for _ in range(50))
            )
        statuses = [response.status_code for response in responses]
        assert app.calls == 1
        assert set(statuses) <= {200, 409}
        assert {response.content for response in responses if response.status_code == 200} == {b"call 1"}
        if mode == "wait":
            assert statuses == [200] * 50


# --- §3.5 same key, different request -------------------------------------------------------------


async def test_same_key_different_body_is_422_and_keeps_the_first_record() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app)
    await call(middleware, headers=idem("k"), body=b"first")
    other = await call(middleware, headers=idem("k"), body=b"second")
    assert other.status == 422
    assert problem_type(other).endswith("/key-reused")
    assert app.calls == 1
    assert (await call(middleware, headers=idem("k"), body=b"first")).body == b"first"


async def test_same_key_different_body_while_in_progress_is_422_in_both_modes() -> None:
    for mode in ("reject", "wait"):
        gate = asyncio.Event()
        app = Slow(gate)
        middleware = IdempotencyMiddleware(app, on_conflict=mode, wait_timeout=LONG_WAIT)
        first = await start_first(middleware, app)
        # Not made to wait for a response it cannot have: a wait would outlast HANG_GUARD.
        other = await asyncio.wait_for(call(middleware, headers=idem("k"), body=b"different"), HANG_GUARD)
        assert other.status == 422
        gate.set()
        await first


async def test_on_mismatch_replay_returns_the_stored_response() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, on_mismatch="replay")
    await call(middleware, headers=idem("k"), body=b"first")
    other = await call(middleware, headers=idem("k"), body=b"second")
    assert other.status == 200
    assert other.body == b"first"
    assert other.header(b"idempotent-replayed") == b"true"
    assert app.calls == 1


@pytest.mark.parametrize(
    "change",
    [{"path": "/v1/other"}, {"method": "PATCH"}, {"query_string": b"dry_run=1"}],
    ids=["path", "method", "query"],
)
async def test_same_key_on_another_endpoint_is_422_not_a_replay(change: dict[str, object]) -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app)
    await call(middleware, path="/v1/messages", headers=idem("k"))
    other = await call(middleware, **{"path": "/v1/messages", "headers": idem("k"), **change})  # type: ignore[arg-type]
    assert other.status == 422
    assert problem_type(other).endswith("/key-reused")
    assert app.calls == 1


async def test_fingerprint_json_ignores_key_order_and_whitespace() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, fingerprint="json")
    first = await call(middleware, headers=idem("k"), body=b'{"to":"+1555","text":"hi"}')
    same = await call(middleware, headers=idem("k"), body=b'{\n  "text": "hi",\n  "to": "+1555"\n}')
    other = await call(middleware, headers=idem("k"), body=b'{"to":"+1555","text":"bye"}')
    assert same.status == 200
    assert same.body == first.body  # the stored response, not this request's bytes
    assert same.header(b"idempotent-replayed") == b"true"
    assert other.status == 422
    assert app.calls == 1


async def test_fingerprint_raw_treats_reordered_json_as_a_different_request() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app)
    await call(middleware, headers=idem("k"), body=b'{"a":1,"b":2}')
    assert (await call(middleware, headers=idem("k"), body=b'{"b":2,"a":1}')).status == 422


async def test_fingerprint_json_of_a_deeply_nested_body_is_not_a_500() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, fingerprint="json")
    body = b"[" * 50_000
    first = await call(middleware, headers=idem("k"), body=body)
    assert first.status == 200
    assert (await call(middleware, headers=idem("k"), body=body)).header(b"idempotent-replayed") == b"true"


async def test_fingerprint_headers_take_part_in_the_fingerprint() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, fingerprint_headers=("X-Account",))
    await call(middleware, headers=idem("k", (b"x-account", b"a")))
    same = await call(middleware, headers=idem("k", (b"x-account", b"a"), (b"x-trace", b"9")))
    other = await call(middleware, headers=idem("k", (b"x-account", b"b")))
    assert same.header(b"idempotent-replayed") == b"true"
    assert other.status == 422
    assert app.calls == 1


async def test_headers_are_not_part_of_the_fingerprint_by_default() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app)
    await call(middleware, headers=idem("k", (b"x-account", b"a"), (b"user-agent", b"one")))
    replay = await call(middleware, headers=idem("k", (b"x-account", b"b"), (b"user-agent", b"two")))
    assert replay.header(b"idempotent-replayed") == b"true"
