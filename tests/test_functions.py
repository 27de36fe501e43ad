"""SPEC §8.4 in one process: ``@idempotent`` on every store (memory, fakeredis, real Redis)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator

import pytest

from relay_idem import KeyInProgress, KeyReused, MemoryStore, RedisStore, Store, StoreUnavailable, idempotent
from relay_idem.keys import record_key
from relay_idem.metrics import FUNCTION_CALLS, FUNCTION_OUTCOMES
from tests.servers import free_port

pytestmark = pytest.mark.anyio


class Outcomes:
    """``relay_idem_function_calls_total`` by outcome, counted from when it was made."""

    def __init__(self) -> None:
        self.start = self.now()

    @staticmethod
    def now() -> dict[str, float]:
        return {outcome: FUNCTION_CALLS.labels(outcome)._value.get() for outcome in FUNCTION_OUTCOMES}

    def counted(self) -> dict[str, float]:
        now = self.now()
        return {
            outcome: now[outcome] - self.start[outcome]
            for outcome in FUNCTION_OUTCOMES
            if now[outcome] != self.start[outcome]
        }


async def claimed(store: Store, key: str) -> None:
    """Return once a call holds ``key`` (polled, with a generous hang guard)."""
    store_key = record_key(store.prefix, "functions", key)
    deadline = time.monotonic() + 30
    while await store.get(store_key) is None:
        assert time.monotonic() < deadline, f"no call claimed {key!r}"
        await asyncio.sleep(0.01)


@pytest.fixture
def outcomes() -> Iterator[Outcomes]:
    yield Outcomes()


async def test_the_first_call_runs_and_every_later_call_gets_its_value(store: Store, outcomes: Outcomes) -> None:
    runs: list[dict[str, object]] = []

    @idempotent(store, key=lambda job: f"reminder-{job['appointment_id']}")
    async def send_reminder(job: dict[str, object]) -> dict[str, object]:
        runs.append(job)
        return {"sent": len(runs), "to": job["to"], "raw": b"\x00\xff", "items": [1, 2.5, None, True]}

    job = {"appointment_id": 7, "to": "+5511999998888"}
    first = await send_reminder(job)
    again = await send_reminder(job)
    other = await send_reminder({"appointment_id": 8, "to": "+5511999998888"})
    assert first == again == {"sent": 1, "to": "+5511999998888", "raw": b"\x00\xff", "items": [1, 2.5, None, True]}
    assert other["sent"] == 2 and len(runs) == 2
    assert outcomes.counted() == {"executed": 2, "replayed": 1}
    info = await store.get(record_key(store.prefix, "functions", "reminder-7"))
    assert info is not None and info.record.response is not None and info.ttl is not None


async def test_reject_mode_raises_key_in_progress_while_the_first_call_runs(store: Store, outcomes: Outcomes) -> None:
    gate = asyncio.Event()

    @idempotent(store, key=lambda n: "busy", lock_ttl=5)
    async def slow(n: int) -> int:
        await gate.wait()
        return n

    first = asyncio.create_task(slow(1))
    await claimed(store, "busy")
    with pytest.raises(KeyInProgress) as raised:
        await slow(2)
    assert raised.value.key == "busy"
    gate.set()
    assert await first == 1
    assert await slow(3) == 1
    assert outcomes.counted() == {"executed": 1, "replayed": 1, "conflict": 1}


async def test_wait_mode_gets_the_first_calls_value(store: Store) -> None:
    gate = asyncio.Event()
    runs = 0

    @idempotent(store, key=lambda: "shared", on_conflict="wait", wait_timeout=30)
    async def work() -> str:
        nonlocal runs
        runs += 1
        await gate.wait()
        return f"run {runs}"

    calls = [asyncio.create_task(work()) for _ in range(10)]
    await claimed(store, "shared")
    gate.set()
    assert await asyncio.gather(*calls) == ["run 1"] * 10
    assert runs == 1


async def test_a_raising_function_releases_the_key_and_the_next_call_runs(store: Store, outcomes: Outcomes) -> None:
    attempts = 0

    class Flaky(Exception):
        pass

    @idempotent(store, key=lambda: "flaky")
    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise Flaky("first attempt fails")
        return "ok"

    with pytest.raises(Flaky, match="first attempt fails"):
        await flaky()
    assert await flaky() == "ok"
    assert await flaky() == "ok"
    assert attempts == 2
    assert outcomes.counted() == {"released": 1, "executed": 1, "replayed": 1}


async def test_a_value_that_cannot_be_encoded_is_a_type_error_and_releases(store: Store, outcomes: Outcomes) -> None:
    values: list[object] = [object(), "fine"]

    @idempotent(store, key=lambda: "unencodable")
    async def produce() -> object:
        return values.pop(0)

    with pytest.raises(TypeError, match="cannot be encoded"):
        await produce()
    assert await produce() == "fine"
    assert outcomes.counted() == {"released": 1, "executed": 1}


async def test_a_fingerprint_mismatch_raises_key_reused(store: Store, outcomes: Outcomes) -> None:
    @idempotent(
        store, key=lambda order, amount: f"charge-{order}", fingerprint=lambda order, amount: str(amount).encode()
    )
    async def charge(order: str, amount: int) -> int:
        return amount

    assert await charge("o1", 100) == 100
    assert await charge("o1", 100) == 100
    with pytest.raises(KeyReused):
        await charge("o1", 999)
    assert outcomes.counted() == {"executed": 1, "replayed": 1, "mismatch": 1}


async def test_custom_encode_and_decode() -> None:
    store = MemoryStore()

    @idempotent(store, key=lambda: "k", encode=lambda value: repr(value).encode(), decode=lambda data: data.decode())
    async def make() -> tuple[int, int]:
        return (1, 2)

    assert await make() == (1, 2)  # the first caller gets the value itself
    assert await make() == "(1, 2)"  # later callers get what decode makes of the stored bytes


@pytest.mark.parametrize("bad_key", ["", "x" * 256, "has space", "tab\t", "é", 42])
async def test_a_bad_key_is_a_value_error_before_anything_runs(bad_key: object) -> None:
    runs = 0

    @idempotent(MemoryStore(), key=lambda: bad_key)  # type: ignore[arg-type,return-value]
    async def work() -> None:
        nonlocal runs
        runs += 1

    with pytest.raises(ValueError):
        await work()
    assert runs == 0


def test_bad_options_are_refused_when_decorating() -> None:
    store = MemoryStore()
    with pytest.raises(ValueError, match="on_conflict"):
        idempotent(store, key=lambda: "k", on_conflict="queue")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lock_ttl"):
        idempotent(store, key=lambda: "k", lock_ttl=0)
    with pytest.raises(ValueError, match="scope"):
        idempotent(store, key=lambda: "k", scope="")
    with pytest.raises(ValueError, match="complete_retry"):
        idempotent(store, key=lambda: "k", complete_retry=-1)
    with pytest.raises(TypeError, match="async def"):
        idempotent(store, key=lambda: "k")(lambda: None)  # type: ignore[arg-type,return-value]


async def test_a_store_outage_raises_store_unavailable_without_running(outcomes: Outcomes) -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    runs = 0

    @idempotent(store, key=lambda: "k")
    async def work() -> None:
        nonlocal runs
        runs += 1

    try:
        with pytest.raises(StoreUnavailable):
            await work()
    finally:
        await store.close()
    assert runs == 0
    assert outcomes.counted() == {"store_error": 1}


async def test_a_completion_after_a_lost_lease_is_not_stored_and_the_caller_gets_its_value(
    outcomes: Outcomes, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    key = record_key(store.prefix, "functions", "paused")

    @idempotent(store, key=lambda: "paused")
    async def paused() -> str:
        # Another owner takes the key meanwhile (as after a pause past lock_ttl).
        await store.delete(key)
        newer = await store.begin(key, b"", 10)
        assert newer.acquired
        return "late"

    with caplog.at_level(logging.WARNING, logger="relay_idem"):
        assert await paused() == "late"
    assert outcomes.counted() == {"not_stored": 1}
    assert any("lease lost" in record.getMessage() for record in caplog.records)
    info = await store.get(key)
    assert info is not None and info.record.response is None  # the newer owner's claim is untouched


async def test_the_lease_is_renewed_while_the_function_runs(store: Store) -> None:
    gate = asyncio.Event()

    @idempotent(store, key=lambda: "long", lock_ttl=0.6)
    async def long() -> str:
        await gate.wait()
        return "done"

    first = asyncio.create_task(long())
    await claimed(store, "long")
    held_since = time.monotonic()
    while time.monotonic() - held_since < 2.0:  # over three lock_ttl: without renewal the claim would be gone
        with pytest.raises(KeyInProgress):
            await long()
        await asyncio.sleep(0.1)
    gate.set()
    assert await first == "done"


async def run_once_under_a_storm(store: Store, key: str) -> None:
    """50 concurrent calls, one key: one run, one value for all (used on Cluster and Sentinel too)."""
    runs = 0

    @idempotent(store, key=lambda: key, on_conflict="wait", wait_timeout=30)
    async def work() -> dict[str, int]:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.2)
        return {"run": runs}

    assert await asyncio.gather(*(work() for _ in range(50))) == [{"run": 1}] * 50
    assert runs == 1


async def run_once_on(url: str) -> None:
    """:func:`run_once_under_a_storm` on a fresh ``RedisStore.from_url(url)``, with a prefix of its own."""
    store = RedisStore.from_url(url, prefix=f"functions-{uuid.uuid4().hex[:12]}")
    try:
        await run_once_under_a_storm(store, "reminder-1")
    finally:
        await store.close()


async def test_a_storm_of_calls_runs_once(store: Store) -> None:
    await run_once_under_a_storm(store, "storm")
