"""SPEC §3.7 errors, the store failing (``on_store_error``), and the §5 metrics the middleware moves."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from relay_idem import IdempotencyMiddleware, MemoryStore
from relay_idem.exceptions import StoreUnavailable
from relay_idem.keys import record_key
from relay_idem.metrics import OUTCOMES
from relay_idem.problems import TYPE_BASE, Problem
from relay_idem.scopes import ANONYMOUS_SCOPE
from relay_idem.store import Claim, Record
from tests.apps import AppFailed, Counter, Echo, Raising, Result, Scope, Send, Slow, Statuses, call, idem

pytestmark = pytest.mark.anyio


class FailingStore(MemoryStore):
    """A MemoryStore whose named operations raise ``StoreUnavailable``, as a RedisStore does when Redis is down."""

    def __init__(self, *failing: str) -> None:
        super().__init__()
        self.failing = set(failing)

    def check(self, operation: str) -> None:
        if operation in self.failing:
            raise StoreUnavailable(f"{operation}: ConnectionError: Connection refused")

    async def begin(self, key: str, fingerprint: bytes, lock_ttl: float) -> Claim:
        self.check("begin")
        return await super().begin(key, fingerprint, lock_ttl)

    async def complete(self, key: str, token: str, record: Record, ttl: float) -> bool:
        self.check("complete")
        return await super().complete(key, token, record, ttl)

    async def release(self, key: str, token: str) -> bool:
        self.check("release")
        return await super().release(key, token)

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        self.check("renew")
        return await super().renew(key, token, lock_ttl)


def problem(result: Result) -> dict[str, Any]:
    """The problem+json document of ``result``, checked for the RFC 9457 members SPEC §3.7 names."""
    assert result.header(b"content-type") == b"application/problem+json"
    assert result.header(b"content-length") == str(len(result.body)).encode()
    document: dict[str, Any] = json.loads(result.body)
    assert set(document) >= {"type", "title", "status", "detail"}
    assert document["status"] == result.status
    assert document["type"].startswith(TYPE_BASE)
    assert document["title"]
    assert document["detail"]
    assert "Traceback" not in result.body.decode()
    return document


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def outcomes() -> dict[str, float]:
    return {outcome: sample("relay_idem_requests_total", {"outcome": outcome}) for outcome in OUTCOMES}


class Delta:
    """How much each outcome counter moved while the block ran (the counters are process-global)."""

    def __init__(self) -> None:
        self.moved: dict[str, float] = {}

    def __enter__(self) -> Delta:
        self.before = outcomes()
        return self

    def __exit__(self, *exc: object) -> None:
        after = outcomes()
        self.moved = {outcome: after[outcome] - self.before[outcome] for outcome in OUTCOMES}
        self.moved = {outcome: moved for outcome, moved in self.moved.items() if moved}


# --- §3.7 every error is problem+json, each situation its own type -------------------------------


async def test_every_error_is_problem_json_with_a_distinct_type() -> None:
    types: dict[str, tuple[int, str]] = {}

    def record(situation: str, result: Result, status: int) -> None:
        assert result.status == status, situation
        types[situation] = (status, problem(result)["type"])

    app = Counter()
    middleware = IdempotencyMiddleware(app, require_key=("/required",), max_request_bytes=10)
    record("malformed key", await call(middleware, headers=idem(b"bad key")), 400)
    record("duplicate key header", await call(middleware, headers=[*idem("a"), *idem("b")]), 400)
    record("key required", await call(middleware, path="/required"), 400)
    record("body too large", await call(middleware, headers=idem("big"), body=b"x" * 11), 413)
    await call(middleware, headers=idem("used"))
    record("key reused", await call(middleware, headers=idem("used"), body=b"other"), 422)

    gate = asyncio.Event()
    slow = Slow(gate)
    busy = IdempotencyMiddleware(slow)
    first = asyncio.create_task(call(busy, headers=idem("k")))
    await slow.started.wait()
    conflict = await call(busy, headers=idem("k"))
    record("in progress", conflict, 409)
    gate.set()
    await first

    down = await call(IdempotencyMiddleware(Counter(), store=FailingStore("begin")), headers=idem("k"))
    record("store unavailable", down, 503)
    with pytest.raises(AppFailed):
        failed: list[Result] = []

        async def keep(message: dict[str, Any], result: Result) -> None:
            failed[:] = [result]

        await call(IdempotencyMiddleware(Raising()), headers=idem("k"), on_send=keep)
    record("app failed", failed[0], 500)

    assert conflict.header(b"retry-after") == b"1"
    assert down.header(b"retry-after") == b"1"
    assert len({kind for _, kind in types.values()}) == len(types), types
    assert app.calls == 1


def defined_problems() -> list[Problem]:
    """Every problem type relay-idem answers with: the middleware's, the proxy's and the demo's."""
    from relay_idem import demo, problems, proxy

    modules = (problems, proxy, demo)
    return [value for module in modules for value in vars(module).values() if isinstance(value, Problem)]


# RFC 4151: tag:<authority>,<date>:<specific>, the authority a DNS name, the date YYYY[-MM[-DD]].
TAG_URI = re.compile(r"tag:[a-z0-9.-]+,\d{4}(-\d{2}){0,2}:[A-Za-z0-9/._~-]+")


def test_problem_types_are_distinct_tag_uris_each_ending_in_its_slug() -> None:
    defined = set(defined_problems())
    assert len(defined) >= 15
    assert len({problem.type for problem in defined}) == len(defined)
    for problem in defined:
        # SPEC §8.2: a client recognises a type by its last path segment ("…/invalid-key").
        assert TAG_URI.fullmatch(problem.type), problem.type
        assert problem.type.startswith(TYPE_BASE) and problem.type.endswith("/" + problem.slug)


def test_the_readme_lists_every_problem_type_with_its_status() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(tag:[^`]+)` \| (\d{3})", readme, flags=re.MULTILINE))
    assert rows == {problem.type: str(problem.status) for problem in defined_problems()}


@pytest.mark.parametrize("retry_after", [0, 1, 7])
async def test_retry_after_is_a_whole_number_of_seconds_at_least_1(retry_after: int) -> None:
    from relay_idem.problems import KEY_IN_PROGRESS, send_problem

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await send_problem(send, KEY_IN_PROGRESS, "busy", retry_after=retry_after)
    headers = dict(sent[0]["headers"])
    assert headers[b"retry-after"] == str(max(1, retry_after)).encode()


@pytest.mark.parametrize(
    ("body", "declared"),
    [
        pytest.param([b"x" * 11], b"11", id="declared-content-length"),
        pytest.param([b"x" * 6, b"x" * 6], None, id="counted-while-streaming"),
        pytest.param([b"x" * 6, b"x" * 6], b"5", id="more-than-declared"),
        pytest.param([b"x"], b"9" * 5000, id="declared-with-5000-digits"),
    ],
)
async def test_body_over_max_request_bytes_is_413_and_app_not_called(body: list[bytes], declared: bytes | None) -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, max_request_bytes=10)
    headers = idem("k") + ([(b"content-length", declared)] if declared else [])
    result = await call(middleware, headers=headers, body=body)
    assert result.status == 413
    assert problem(result)["type"].endswith("/request-too-large")
    assert app.calls == 0
    assert (await call(middleware, headers=idem("k"), body=b"x" * 10)).body == b"x" * 10  # released: it executes


async def test_body_limit_applies_only_to_keyed_requests() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, max_request_bytes=10)
    assert (await call(middleware, body=b"x" * 100)).body == b"x" * 100


@pytest.mark.parametrize(
    "headers",
    [idem(b""), idem(b"a b"), [*idem("k"), *idem("k")]],
    ids=["empty", "malformed", "duplicate"],
)
async def test_rejected_requests_store_nothing(headers: list[tuple[bytes, bytes]]) -> None:
    store = MemoryStore()
    app = Counter()
    assert (await call(IdempotencyMiddleware(app, store=store), headers=headers)).status == 400
    assert store._entries == {}


# --- store failures ---------------------------------------------------------------------------------


async def test_store_down_with_on_store_error_closed_is_503_with_retry_after(caplog: pytest.LogCaptureFixture) -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, store=FailingStore("begin"))
    with caplog.at_level(logging.WARNING, logger="relay_idem"):
        result = await call(middleware, headers=idem("k"))
    assert result.status == 503
    assert problem(result)["type"].endswith("/store-unavailable")
    assert result.header(b"retry-after") == b"1"
    assert app.calls == 0
    assert any("store unavailable" in record.getMessage() for record in caplog.records)


async def test_store_down_with_on_store_error_open_passes_the_request_through() -> None:
    app = Echo([(b"x-app", b"1")])
    middleware = IdempotencyMiddleware(app, store=FailingStore("begin"), on_store_error="open")
    result = await call(middleware, headers=idem("k"), body=[b"hel", b"lo"])
    assert result.status == 200
    assert result.body == b"hello"
    assert result.headers == [(b"x-app", b"1"), (b"content-length", b"5")]
    again = await call(middleware, headers=idem("k"), body=b"hello")
    assert again.header(b"idempotent-replayed") is None
    assert app.calls == 2
    assert "idempotency" not in app.scopes[0]["extensions"]


async def test_store_recovering_resumes_idempotency_by_itself() -> None:
    store = FailingStore("begin")
    app = Counter()
    middleware = IdempotencyMiddleware(app, store=store)
    assert (await call(middleware, headers=idem("k"))).status == 503
    store.failing.clear()
    assert (await call(middleware, headers=idem("k"))).body == b"call 1"
    assert (await call(middleware, headers=idem("k"))).header(b"idempotent-replayed") == b"true"


async def test_store_failing_at_completion_still_sends_the_response(caplog: pytest.LogCaptureFixture) -> None:
    """Without retries (complete_retry=0); with them, tests/test_outcome_retry.py."""
    app = Counter()
    middleware = IdempotencyMiddleware(app, store=FailingStore("complete"), complete_retry=0)
    with caplog.at_level(logging.WARNING, logger="relay_idem"), Delta() as moved:
        result = await call(middleware, headers=idem("k"))
    assert result.status == 200
    assert result.body == b"call 1"
    assert moved.moved == {"not_stored": 1}
    assert any("could not store the outcome" in record.getMessage() for record in caplog.records)


async def test_store_failing_at_release_still_sends_the_response() -> None:
    app = Statuses(503)
    middleware = IdempotencyMiddleware(app, store=FailingStore("release"), complete_retry=0)
    result = await call(middleware, headers=idem("k"))
    assert result.status == 503
    assert result.body == b"call 1: 503"


async def test_store_failing_at_renewal_does_not_stop_the_app(caplog: pytest.LogCaptureFixture) -> None:
    app = Slow(delay=0.15)
    middleware = IdempotencyMiddleware(app, store=FailingStore("renew"), lock_ttl=0.09)
    with caplog.at_level(logging.WARNING, logger="relay_idem"):
        result = await call(middleware, headers=idem("k"))
    assert result.body == b"call 1"
    assert any("renewal failed" in record.getMessage() for record in caplog.records)


async def test_store_failing_while_waiting_is_503() -> None:
    store = FailingStore()
    gate = asyncio.Event()
    app = Slow(gate)
    middleware = IdempotencyMiddleware(app, store=store, on_conflict="wait", wait_timeout=5)
    first = asyncio.create_task(call(middleware, headers=idem("k")))
    await app.started.wait()
    repeat = asyncio.create_task(call(middleware, headers=idem("k")))
    await asyncio.sleep(0.05)
    store.failing.add("begin")
    gate.set()
    assert (await first).status == 200
    result = await asyncio.wait_for(repeat, 2.0)
    assert result.status == 503
    assert problem(result)["type"].endswith("/store-unavailable")


async def test_lease_lost_the_late_outcome_is_refused_and_never_overwrites_the_new_owner(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    key = record_key(store.prefix, ANONYMOUS_SCOPE, "secret-key")
    newer: list[Claim] = []

    class Paused(Counter):
        """Loses its lease mid-run, as a process paused past lock_ttl does, and another owner claims the key."""

        async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
            await store.delete(key)
            newer.append(await store.begin(key, b"newer owner", 10))
            await super().handle(scope, body, send)

    lease_lost = sample("relay_idem_lease_lost_total")
    with caplog.at_level(logging.WARNING, logger="relay_idem"), Delta() as moved:
        result = await call(IdempotencyMiddleware(Paused(), store=store), headers=idem("secret-key"))
    assert result.body == b"call 1"  # the response still goes out
    assert moved.moved == {"not_stored": 1}
    assert sample("relay_idem_lease_lost_total") == lease_lost + 1
    info = await store.get(key)
    assert info is not None
    assert info.record.fingerprint == b"newer owner"
    assert info.record.response is None
    messages = [record.getMessage() for record in caplog.records]
    assert any("lease lost" in message for message in messages)
    assert not any("secret-key" in message for message in messages)


# --- §5 metrics ----------------------------------------------------------------------------------


async def test_metrics_outcomes_move_as_documented() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, require_key=("/required",), max_request_bytes=10)

    async def moved_by(**request: Any) -> dict[str, float]:
        with Delta() as delta:
            await call(middleware, **request)
        return delta.moved

    assert await moved_by(headers=idem("k"), body=b"one") == {"executed": 1}
    assert await moved_by(headers=idem("k"), body=b"one") == {"replayed": 1}
    assert await moved_by(headers=idem("k"), body=b"two") == {"mismatch": 1}
    assert await moved_by(headers=idem(b"bad key")) == {"invalid": 1}
    assert await moved_by(headers=[*idem("a"), *idem("b")]) == {"invalid": 1}
    assert await moved_by(path="/required") == {"invalid": 1}
    assert await moved_by(headers=idem("big"), body=b"x" * 11) == {"invalid": 1}
    assert await moved_by(body=b"no key") == {"bypass": 1}
    assert await moved_by(method="GET", headers=idem("k")) == {}
    assert await moved_by(method="GET") == {}
    assert await moved_by(method="DELETE", path="/required") == {}


async def test_metrics_conflict_store_error_and_not_stored() -> None:
    gate = asyncio.Event()
    slow = Slow(gate)
    middleware = IdempotencyMiddleware(slow)
    first = asyncio.create_task(call(middleware, headers=idem("k")))
    await slow.started.wait()
    with Delta() as conflict:
        await call(middleware, headers=idem("k"))
    gate.set()
    await first
    waiting = IdempotencyMiddleware(Slow(delay=0.2), on_conflict="wait", wait_timeout=0.05)
    held = asyncio.create_task(call(waiting, headers=idem("k")))
    await asyncio.sleep(0.01)
    with Delta() as wait_timed_out:
        await call(waiting, headers=idem("k"))
    await held
    with Delta() as closed:
        await call(IdempotencyMiddleware(Counter(), store=FailingStore("begin")), headers=idem("k"))
    open_middleware = IdempotencyMiddleware(Counter(), store=FailingStore("begin"), on_store_error="open")
    with Delta() as opened:
        await call(open_middleware, headers=idem("k"))
    with Delta() as released:
        await call(IdempotencyMiddleware(Statuses(429)), headers=idem("k"))
    assert conflict.moved == {"conflict": 1}
    assert wait_timed_out.moved == {"conflict": 1}
    assert closed.moved == {"store_error": 1}
    assert opened.moved == {"store_error": 1}
    assert released.moved == {"not_stored": 1}


async def test_metrics_app_failure_counts_as_executed_and_a_waiter_replay_as_replayed() -> None:
    with Delta() as failed, pytest.raises(AppFailed):
        await call(IdempotencyMiddleware(Raising()), headers=idem("k"))
    gate = asyncio.Event()
    slow = Slow(gate)
    middleware = IdempotencyMiddleware(slow, on_conflict="wait", wait_timeout=5)
    with Delta() as both:
        first = asyncio.create_task(call(middleware, headers=idem("k")))
        await slow.started.wait()
        repeat = asyncio.create_task(call(middleware, headers=idem("k")))
        await asyncio.sleep(0.02)
        gate.set()
        await asyncio.gather(first, repeat)
    assert failed.moved == {"executed": 1}
    assert both.moved == {"executed": 1, "replayed": 1}


async def test_metrics_store_seconds_observes_each_store_operation() -> None:
    def count(op: str) -> float:
        return sample("relay_idem_store_seconds_count", {"op": op})

    before = {op: count(op) for op in ("begin", "complete", "release", "renew")}
    await call(IdempotencyMiddleware(Slow(delay=0.1), lock_ttl=0.15), headers=idem("k"))
    await call(IdempotencyMiddleware(Statuses(503)), headers=idem("k"))
    moved = {op: count(op) - before[op] for op in before}
    assert moved["begin"] == 2
    assert moved["complete"] == 1
    assert moved["release"] == 1
    assert moved["renew"] >= 1
