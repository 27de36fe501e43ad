"""The store contract (``relay_idem.Store``), one suite for MemoryStore, RedisStore on fakeredis and on Redis."""

from __future__ import annotations

import asyncio
import time

import pytest

from relay_idem import Store
from relay_idem.store import Claim, Record, StoredResponse
from tests.apps import HANG_GUARD, LONG_WAIT

pytestmark = pytest.mark.anyio

FINGERPRINT = b"\x01" * 16
RESPONSE = StoredResponse(
    201,
    ((b"content-type", b"application/json"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"x-bin", b"\xff\x00")),
    b'{"id": 1}\x00\xff',
)
# SPEC 6a asks for the replay within 50 ms of the completion; that is a figure the benchmark measures
# (python -m benchmarks). Here the property is the event: the waiter is woken by the store's
# notification, not by looking again. With polling out of the way (`no_polling`: a waiter would look
# again only after LONG_WAIT), a waiter that returns before then was woken by the notification;
# HANG_GUARD only stops a test that hangs.


def key_of(store: Store, name: str = "k") -> str:
    return f"{store.prefix}:{name}"


def completed(claim: Claim, response: StoredResponse = RESPONSE) -> Record:
    return Record(claim.record.fingerprint, claim.record.created_at, response)


async def acquire(store: Store, key: str, lock_ttl: float = 10.0) -> str:
    claim = await store.begin(key, FINGERPRINT, lock_ttl)
    assert claim.token is not None
    return claim.token


async def ready_to_wait(store: Store) -> None:
    """Let a store that wakes waiters by subscription subscribe first (returns at once for the others)."""
    await store.wait(key_of(store, "warm-up"), time.monotonic(), 2.0)


async def test_store_implements_the_protocol(store: Store) -> None:
    assert isinstance(store, Store)


async def test_begin_on_a_free_key_acquires_it(store: Store) -> None:
    before = time.time()
    claim = await store.begin(key_of(store), FINGERPRINT, 10)
    assert claim.acquired
    assert claim.token
    assert claim.record.fingerprint == FINGERPRINT
    assert claim.record.response is None
    assert before - 1 <= claim.record.created_at <= time.time() + 1


async def test_begin_gives_every_claim_a_fresh_token(store: Store) -> None:
    first = await acquire(store, key_of(store, "a"))
    second = await acquire(store, key_of(store, "b"))
    assert first != second


async def test_begin_on_an_in_progress_key_returns_the_existing_record(store: Store) -> None:
    key = key_of(store)
    first = await store.begin(key, FINGERPRINT, 10)
    repeat = await store.begin(key, b"\x02" * 16, 10)
    assert not repeat.acquired
    assert repeat.token is None
    assert repeat.record.fingerprint == FINGERPRINT
    assert repeat.record.response is None
    assert repeat.record.created_at == pytest.approx(first.record.created_at)


async def test_begin_on_a_completed_key_returns_the_stored_response(store: Store) -> None:
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, 10)
    assert claim.token is not None
    assert await store.complete(key, claim.token, completed(claim), 60)
    repeat = await store.begin(key, FINGERPRINT, 10)
    assert not repeat.acquired
    assert repeat.record.fingerprint == FINGERPRINT
    assert repeat.record.response == RESPONSE


async def test_stored_response_round_trips_exactly(store: Store) -> None:
    key = key_of(store)
    tombstone = StoredResponse(500, (), b"", body_omitted=True)
    for name, response in (("full", RESPONSE), ("tombstone", tombstone), ("empty", StoredResponse(204, (), b""))):
        claim = await store.begin(f"{key}-{name}", FINGERPRINT, 10)
        assert claim.token is not None
        assert await store.complete(f"{key}-{name}", claim.token, completed(claim, response), 60)
        assert (await store.begin(f"{key}-{name}", FINGERPRINT, 10)).record.response == response


async def test_complete_with_the_owner_token_stores_the_record(store: Store) -> None:
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, 10)
    assert claim.token is not None
    assert await store.complete(key, claim.token, completed(claim), 60) is True
    info = await store.get(key)
    assert info is not None
    assert info.record.response == RESPONSE


async def test_complete_with_a_wrong_token_is_refused_and_keeps_the_claim(store: Store) -> None:
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, 10)
    assert claim.token is not None
    assert await store.complete(key, "not-the-owner", completed(claim), 60) is False
    info = await store.get(key)
    assert info is not None
    assert info.record.response is None
    assert await store.complete(key, claim.token, completed(claim), 60) is True


async def test_complete_twice_is_refused_the_second_time(store: Store) -> None:
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, 10)
    assert claim.token is not None
    assert await store.complete(key, claim.token, completed(claim), 60)
    other = StoredResponse(200, (), b"other")
    assert await store.complete(key, claim.token, completed(claim, other), 60) is False
    assert (await store.begin(key, FINGERPRINT, 10)).record.response == RESPONSE


async def test_complete_repeated_with_the_same_record_is_stored(store: Store) -> None:
    """A completion retried after a failure that came once the store had taken it (a lost reply, SPEC 3.8)."""
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, 10)
    assert claim.token is not None
    assert await store.complete(key, claim.token, completed(claim), 60)
    assert await store.complete(key, claim.token, completed(claim), 60) is True
    assert (await store.begin(key, FINGERPRINT, 10)).record.response == RESPONSE


async def test_complete_after_the_lease_expired_and_another_owner_claimed_is_refused(store: Store) -> None:
    """Fencing: a finisher that lost its lease never overwrites the newer owner (SPEC 3.8)."""
    key = key_of(store)
    late = await store.begin(key, FINGERPRINT, 0.05)
    assert late.token is not None
    await asyncio.sleep(0.1)
    newer = await store.begin(key, FINGERPRINT, 10)
    assert newer.acquired
    assert newer.token != late.token
    assert await store.complete(key, late.token, completed(late), 60) is False
    info = await store.get(key)
    assert info is not None
    assert info.record.response is None
    assert newer.token is not None
    assert await store.complete(key, newer.token, completed(newer), 60) is True


async def test_complete_on_a_vacant_expired_key_is_stored(store: Store) -> None:
    """complete.lua: nobody claimed the key since our lease ran out, so keeping the outcome stops a re-execution."""
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, 0.05)
    assert claim.token is not None
    await asyncio.sleep(0.1)
    assert await store.get(key) is None
    assert await store.complete(key, claim.token, completed(claim), 60) is True
    repeat = await store.begin(key, FINGERPRINT, 10)
    assert not repeat.acquired
    assert repeat.record.response == RESPONSE


async def test_release_by_the_owner_frees_the_key(store: Store) -> None:
    key = key_of(store)
    token = await acquire(store, key)
    assert await store.release(key, token) is True
    assert await store.get(key) is None
    again = await store.begin(key, FINGERPRINT, 10)
    assert again.acquired
    assert again.token != token


async def test_release_by_another_token_is_refused(store: Store) -> None:
    key = key_of(store)
    token = await acquire(store, key)
    assert await store.release(key, "not-the-owner") is False
    assert not (await store.begin(key, FINGERPRINT, 10)).acquired
    assert await store.release(key, token) is True
    assert await store.release(key, token) is False


async def test_release_never_removes_a_completed_record(store: Store) -> None:
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, 10)
    assert claim.token is not None
    assert await store.complete(key, claim.token, completed(claim), 60)
    assert await store.release(key, claim.token) is False
    assert (await store.begin(key, FINGERPRINT, 10)).record.response == RESPONSE


async def test_release_of_a_missing_key_is_refused(store: Store) -> None:
    assert await store.release(key_of(store), "token") is False


async def test_renew_by_the_owner_extends_the_lease(store: Store) -> None:
    key = key_of(store)
    token = await acquire(store, key, lock_ttl=0.1)
    assert await store.renew(key, token, 5) is True
    info = await store.get(key)
    assert info is not None
    assert info.ttl is not None
    assert 4 < info.ttl <= 5
    await asyncio.sleep(0.15)
    assert not (await store.begin(key, FINGERPRINT, 10)).acquired


async def test_renew_by_another_token_is_refused_and_does_not_extend(store: Store) -> None:
    key = key_of(store)
    await acquire(store, key, lock_ttl=0.1)
    assert await store.renew(key, "not-the-owner", 5) is False
    await asyncio.sleep(0.15)
    assert (await store.begin(key, FINGERPRINT, 10)).acquired


async def test_renew_of_a_completed_or_missing_key_is_refused(store: Store) -> None:
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, 10)
    assert claim.token is not None
    assert await store.complete(key, claim.token, completed(claim), 60)
    assert await store.renew(key, claim.token, 5) is False
    assert await store.renew(key_of(store, "missing"), claim.token, 5) is False


async def test_lock_expiry_frees_the_key(store: Store) -> None:
    key = key_of(store)
    first = await acquire(store, key, lock_ttl=0.05)
    assert not (await store.begin(key, FINGERPRINT, 10)).acquired
    await asyncio.sleep(0.1)
    second = await store.begin(key, b"\x03" * 16, 10)
    assert second.acquired
    assert second.token != first
    assert second.record.fingerprint == b"\x03" * 16


async def test_ttl_expiry_removes_a_completed_record(store: Store) -> None:
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, 10)
    assert claim.token is not None
    assert await store.complete(key, claim.token, completed(claim), 0.05)
    assert await store.get(key) is not None
    await asyncio.sleep(0.1)
    assert await store.get(key) is None
    assert (await store.begin(key, FINGERPRINT, 10)).acquired


async def test_completed_record_lives_for_ttl_not_lock_ttl(store: Store) -> None:
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, 0.05)
    assert claim.token is not None
    assert await store.complete(key, claim.token, completed(claim), 60)
    await asyncio.sleep(0.1)
    info = await store.get(key)
    assert info is not None
    assert info.ttl is not None
    assert 59 < info.ttl <= 60


async def test_begin_on_a_completed_key_does_not_shorten_its_ttl(store: Store) -> None:
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, 10)
    assert claim.token is not None
    assert await store.complete(key, claim.token, completed(claim), 60)
    await store.begin(key, FINGERPRINT, 0.05)
    await asyncio.sleep(0.1)
    info = await store.get(key)
    assert info is not None
    assert info.record.response == RESPONSE


async def test_wait_is_woken_by_the_completion(store: Store, no_polling: None) -> None:
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, LONG_WAIT)
    assert claim.token is not None
    await ready_to_wait(store)
    waiter = asyncio.create_task(store.wait(key, time.monotonic(), LONG_WAIT))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert await store.complete(key, claim.token, completed(claim), 60)
    # Nothing but the completion's notification ends this wait before LONG_WAIT.
    await asyncio.wait_for(waiter, HANG_GUARD)


async def test_wait_is_woken_by_the_release(store: Store, no_polling: None) -> None:
    key = key_of(store)
    token = await acquire(store, key, lock_ttl=LONG_WAIT)
    await ready_to_wait(store)
    waiter = asyncio.create_task(store.wait(key, time.monotonic(), LONG_WAIT))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert await store.release(key, token)
    await asyncio.wait_for(waiter, HANG_GUARD)


async def test_wait_wakes_every_waiter_of_the_key(store: Store, no_polling: None) -> None:
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, LONG_WAIT)
    assert claim.token is not None
    await ready_to_wait(store)
    since = time.monotonic()
    waiters = [asyncio.create_task(store.wait(key, since, LONG_WAIT)) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert not any(waiter.done() for waiter in waiters)
    assert await store.complete(key, claim.token, completed(claim), 60)
    await asyncio.wait_for(asyncio.gather(*waiters), HANG_GUARD)


async def test_wait_is_not_woken_by_another_keys_completion(store: Store, no_polling: None) -> None:
    key, other = key_of(store, "a"), key_of(store, "b")
    token = await acquire(store, key, lock_ttl=LONG_WAIT)
    other_claim = await store.begin(other, FINGERPRINT, LONG_WAIT)
    assert other_claim.token is not None
    await ready_to_wait(store)
    since = time.monotonic()
    waiter = asyncio.create_task(store.wait(key, since, LONG_WAIT))
    other_waiter = asyncio.create_task(store.wait(other, since, LONG_WAIT))
    await asyncio.sleep(0.05)
    assert await store.complete(other, other_claim.token, completed(other_claim), 60)
    # Once the other key's waiter has its notification, ours has been passed over by it.
    await asyncio.wait_for(other_waiter, HANG_GUARD)
    await asyncio.sleep(0)
    assert not waiter.done()
    assert await store.release(key, token)
    await asyncio.wait_for(waiter, HANG_GUARD)


async def test_wait_returns_after_the_timeout_when_nothing_changes(store: Store) -> None:
    key = key_of(store)
    await acquire(store, key)
    await ready_to_wait(store)
    started = time.monotonic()
    await asyncio.wait_for(store.wait(key, started, 0.2), HANG_GUARD)
    assert time.monotonic() - started >= 0.18


async def test_wait_returns_at_once_if_the_key_changed_after_since(store: Store, no_polling: None) -> None:
    key = key_of(store)
    claim = await store.begin(key, FINGERPRINT, LONG_WAIT)
    assert claim.token is not None
    await ready_to_wait(store)
    since = time.monotonic()
    assert await store.complete(key, claim.token, completed(claim), 60)
    await asyncio.sleep(0.02)
    # The change happened before the wait began, so no notification will come: only seeing the change
    # (not waiting for one) ends this wait before LONG_WAIT.
    await asyncio.wait_for(store.wait(key, since, LONG_WAIT), HANG_GUARD)


async def test_get_of_a_missing_key_is_none(store: Store) -> None:
    assert await store.get(key_of(store)) is None


async def test_get_shows_an_in_progress_record_and_its_lease(store: Store) -> None:
    key = key_of(store)
    await acquire(store, key, lock_ttl=5)
    info = await store.get(key)
    assert info is not None
    assert info.record.fingerprint == FINGERPRINT
    assert info.record.response is None
    assert info.ttl is not None
    assert 4 < info.ttl <= 5


async def test_delete_removes_a_record_whatever_its_state(store: Store) -> None:
    in_progress, done = key_of(store, "a"), key_of(store, "b")
    await acquire(store, in_progress)
    claim = await store.begin(done, FINGERPRINT, 10)
    assert claim.token is not None
    assert await store.complete(done, claim.token, completed(claim), 60)
    for key in (in_progress, done):
        assert await store.delete(key) is True
        assert await store.get(key) is None
        assert await store.delete(key) is False
        assert (await store.begin(key, FINGERPRINT, 10)).acquired


async def test_delete_of_an_expired_record_removes_nothing(store: Store) -> None:
    key = key_of(store)
    await acquire(store, key, lock_ttl=0.05)
    await asyncio.sleep(0.1)
    assert await store.delete(key) is False


async def test_ping_answers(store: Store) -> None:
    assert await store.ping() is None
