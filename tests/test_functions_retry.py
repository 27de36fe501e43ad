"""SPEC §3.8 for idempotent functions (§8.4): a value the store failed to take is kept and retried.

The same machinery as HTTP outcomes (relay_idem/pending.py; tests/test_outcome_retry.py): the
caller gets its value at once, the write goes on in the background with the claim renewed, and a
call with the key meanwhile gets ``KeyInProgress`` (or waits), never a second run. The store is a
MemoryStore whose operations fail on demand; tests/test_faults_completion.py does it with a real
redis-server paused or cut off.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from relay_idem import KeyInProgress, drain_pending_writes, idempotent
from relay_idem.keys import record_key
from tests.test_functions import Outcomes
from tests.test_middleware_errors import Delta, FailingStore, sample
from tests.test_outcome_retry import HANG_GUARD, CountingStore, given_up, pending_gauge, until, warnings

pytestmark = pytest.mark.anyio


async def test_the_caller_gets_its_value_at_once_and_the_write_lands_later_without_a_second_run() -> None:
    store = CountingStore("complete")
    lock_ttl = 0.5
    runs = 0

    @idempotent(store, key=lambda job: f"reminder-{job}", lock_ttl=lock_ttl)
    async def send_reminder(job: int) -> str:
        nonlocal runs
        runs += 1
        return f"msg_{runs}"

    outcomes = Outcomes()
    gauge = pending_gauge()
    with Delta() as http:
        assert await send_reminder(1) == "msg_1"  # at once, though the store took nothing
        assert pending_gauge() == gauge + 1
        assert outcomes.counted() == {}  # counted when the write ends, not before
        # Three leases long, while the store takes no value: the claim is renewed, every call is refused.
        refused_until = time.monotonic() + 3 * lock_ttl
        while time.monotonic() < refused_until:
            with pytest.raises(KeyInProgress):
                await send_reminder(1)
            await asyncio.sleep(0.05)
        assert store.calls["renew"] >= 3
        store.failing.clear()
        await asyncio.wait_for(send_reminder.drain(), HANG_GUARD)
    assert pending_gauge() == gauge
    assert http.moved == {}  # the HTTP requests' counter is not touched
    counted = outcomes.counted()
    assert set(counted) == {"executed", "conflict"}
    assert counted["executed"] == 1 and counted["conflict"] >= 3
    assert await send_reminder(1) == "msg_1"  # the stored value
    assert runs == 1
    assert outcomes.counted() == {**counted, "replayed": 1}


async def test_a_waiting_call_gets_the_value_once_the_retried_write_lands() -> None:
    store = FailingStore("complete")
    runs = 0

    @idempotent(store, key=lambda: "shared", on_conflict="wait", wait_timeout=HANG_GUARD)
    async def work() -> str:
        nonlocal runs
        runs += 1
        return f"run {runs}"

    assert await work() == "run 1"
    waiting = asyncio.create_task(work())
    await until(lambda: bool(store._events), "the second call to wait")
    store.failing.clear()
    assert await asyncio.wait_for(waiting, HANG_GUARD) == "run 1"
    assert runs == 1


async def test_a_value_that_cannot_land_within_complete_retry_is_given_up_once_and_the_next_call_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FailingStore("complete", "renew")
    runs = 0

    @idempotent(store, key=lambda: "k", lock_ttl=0.3, complete_retry=0.3)
    async def work() -> int:
        nonlocal runs
        runs += 1
        return runs

    outcomes = Outcomes()
    timeouts = given_up("timeout")
    with caplog.at_level(logging.INFO, logger="relay_idem"):
        assert await work() == 1
        await asyncio.wait_for(work.drain(), HANG_GUARD)
    assert outcomes.counted() == {"not_stored": 1}
    assert given_up("timeout") == timeouts + 1
    assert len(warnings(caplog, "could not store the outcome")) == 1
    assert len(warnings(caplog, "")) == 1
    store.failing.clear()

    async def runs_again() -> int:
        deadline = time.monotonic() + HANG_GUARD
        while True:  # the claim, no longer renewed, runs out after lock_ttl
            try:
                return await work()
            except KeyInProgress:
                assert time.monotonic() < deadline, "the claim never ran out"
                await asyncio.sleep(0.02)

    assert await runs_again() == 2
    assert outcomes.counted().get("not_stored") == 1
    assert outcomes.counted().get("executed") == 1


async def test_complete_retry_0_gives_up_at_once() -> None:
    @idempotent(FailingStore("complete"), key=lambda: "k", complete_retry=0)
    async def work() -> str:
        return "done"

    outcomes = Outcomes()
    gauge = pending_gauge()
    assert await work() == "done"
    assert outcomes.counted() == {"not_stored": 1}
    assert pending_gauge() == gauge


async def test_a_failed_release_after_a_raise_is_retried_so_the_next_call_runs_before_the_lease_ends() -> None:
    store = FailingStore("release")
    attempts = 0

    class Flaky(Exception):
        pass

    @idempotent(store, key=lambda: "flaky", lock_ttl=60)
    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise Flaky("the first attempt fails")
        return "ok"

    outcomes = Outcomes()
    with pytest.raises(Flaky):
        await flaky()
    with pytest.raises(KeyInProgress):
        await flaky()  # still claimed: the release has not landed
    store.failing.clear()
    await asyncio.wait_for(flaky.drain(), HANG_GUARD)
    assert await flaky() == "ok"  # long before the 60 s lease would have run out
    assert attempts == 2
    assert outcomes.counted() == {"released": 1, "conflict": 1, "executed": 1}


async def test_a_newer_owner_refuses_the_late_write_and_it_counts_as_lease_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FailingStore("complete", "renew")

    @idempotent(store, key=lambda: "k", lock_ttl=0.1)
    async def work() -> str:
        return "late"

    key = record_key(store.prefix, "functions", "k")
    outcomes = Outcomes()
    lease_lost = sample("relay_idem_lease_lost_total")
    with caplog.at_level(logging.WARNING, logger="relay_idem"):
        assert await work() == "late"
        deadline = time.monotonic() + HANG_GUARD
        while not (await store.begin(key, b"newer owner", 10)).acquired:  # once the lease is over
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        store.failing.clear()
        await asyncio.wait_for(work.drain(), HANG_GUARD)
    assert outcomes.counted() == {"not_stored": 1}
    assert sample("relay_idem_lease_lost_total") == lease_lost + 1
    assert len(warnings(caplog, "lease lost")) == 1
    info = await store.get(key)
    assert info is not None
    assert (info.record.fingerprint, info.record.response) == (b"newer owner", None)


async def test_drain_pending_writes_waits_for_every_functions_writes() -> None:
    store = CountingStore("complete")

    @idempotent(store, key=lambda n: f"a-{n}")
    async def first(n: int) -> int:
        return n

    @idempotent(store, key=lambda n: f"b-{n}")
    async def second(n: int) -> int:
        return -n

    assert (await first(1), await second(1)) == (1, -1)
    gauge = pending_gauge()
    drained = asyncio.create_task(drain_pending_writes())
    attempts = store.calls["complete"]
    await until(lambda: store.calls["complete"] >= attempts + 4, "more attempts while draining")
    assert not drained.done()  # the store still takes nothing
    store.failing.clear()
    await asyncio.wait_for(drained, HANG_GUARD)
    assert pending_gauge() == gauge - 2
    for key in ("a-1", "b-1"):
        info = await store.get(record_key(store.prefix, "functions", key))
        assert info is not None and info.record.response is not None
