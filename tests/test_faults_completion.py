"""Redis failing while a keyed request's outcome is written (SPEC §3.8): the process keeps it and retries.

Real redis-server processes with append-only persistence (``appendfsync always``: a restart loses
nothing acknowledged) are paused (SIGSTOP) or killed just as the app answers; the client gets its
response at once, and the outcome lands once Redis is back, so the repeat is a replay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from relay_idem import IdempotencyMiddleware, KeyInProgress, RedisStore, StoreUnavailable, idempotent
from relay_idem.keys import record_key
from relay_idem.scopes import ANONYMOUS_SCOPE
from tests.redis_servers import DelayProxy, RedisServer, start_standalone
from tests.relay_processes import MESSAGE, keyed, metric, new_id, running_proxy, wait_for
from tests.test_functions import Outcomes
from tests.test_middleware_errors import Delta, sample

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

APPEND_ONLY = ["appendonly yes", "appendfsync always"]
HANG_GUARD = 15.0
# uvicorn re-raises the SIGTERM it handled once shutdown is complete.
CLEAN_EXIT = (0, -signal.SIGTERM)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with start_standalone(config=APPEND_ONLY) as server:
        yield server


class FaultyApp:
    """Runs ``fault`` just before its first answer (``status``); later calls answer 200. Counts its runs."""

    def __init__(self, fault: Callable[[], None], status: int = 200) -> None:
        self.fault = fault
        self.status = status
        self.executions = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.executions += 1
        status = 200
        if self.executions == 1:
            self.fault()
            status = self.status
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"sent %d" % self.executions})


def through(middleware: IdempotencyMiddleware) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(middleware), base_url="http://test")


async def post(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post("/v1/messages", content=MESSAGE, headers=keyed(key))


async def settled(middleware: IdempotencyMiddleware) -> float:
    async def nothing_pending() -> bool:
        return not middleware.pending

    return await wait_for(nothing_pending, timeout=HANG_GUARD, what="the pending write to settle")


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


async def test_redis_paused_while_the_outcome_is_written(server: RedisServer) -> None:
    app = FaultyApp(server.pause)
    store = RedisStore.from_url(server.url, prefix=new_id())
    middleware = IdempotencyMiddleware(app, store=store)
    key = new_id()
    try:
        async with through(middleware) as client:
            with Delta() as moved:
                first = await post(client, key)
                assert (first.status_code, first.content) == (200, b"sent 1")
                assert len(middleware.pending) == 1
                assert (await post(client, key)).status_code == 503  # Redis still paused: not processed
                server.resume()
                await settled(middleware)
            replay = await post(client, key)
    finally:
        server.resume()
        await store.close()
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == b"sent 1"
    assert app.executions == 1
    assert moved.moved == {"executed": 1, "store_error": 1}


async def test_a_write_whose_reply_came_too_late_is_recognised_when_retried(server: RedisServer) -> None:
    """Redis ran the completion but its reply missed the socket timeout: the retry finds this very
    record and counts it stored, not refused by a newer owner."""
    with DelayProxy(server.port) as slow:
        app = FaultyApp(lambda: setattr(slow, "delay_s", 1.5))
        store = RedisStore.from_url(slow.url, prefix=new_id())
        middleware = IdempotencyMiddleware(app, store=store)
        key = new_id()
        lease_lost = sample("relay_idem_lease_lost_total")
        try:
            warm_up = await store.begin("warm-up", b"", 10)  # Redis has the scripts: no NOSCRIPT round trip
            assert warm_up.token is not None
            assert await store.complete("warm-up", warm_up.token, warm_up.record, 10)
            async with through(middleware) as client:
                with Delta() as moved:
                    assert (await post(client, key)).status_code == 200
                    assert len(middleware.pending) == 1
                    slow.delay_s = 0.0
                    await settled(middleware)
                replay = await post(client, key)
        finally:
            await store.close()
    assert moved.moved == {"executed": 1}
    assert sample("relay_idem_lease_lost_total") == lease_lost
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.executions == 1


@pytest.mark.parametrize("status", [200, 503], ids=["completion", "release"])
async def test_redis_killed_and_restarted_while_the_outcome_is_written(server: RedisServer, status: int) -> None:
    """A 503 is not final (SPEC §3.6): its release is retried too, so the repeat executes at once,
    not after the claim's minute-long lease."""
    app = FaultyApp(server.kill, status)
    prefix = new_id()
    store = RedisStore.from_url(server.url, prefix=prefix)
    middleware = IdempotencyMiddleware(app, store=store, lock_ttl=60)
    key = new_id()
    try:
        async with through(middleware) as client:
            first = await post(client, key)
            assert (first.status_code, first.content) == (status, b"sent 1")
            assert len(middleware.pending) == 1
            aof = b"".join(path.read_bytes() for path in server.dir.rglob("*.aof*") if path.is_file())
            assert record_key(prefix, ANONYMOUS_SCOPE, key).encode() in aof  # the claim outlives the restart
            await asyncio.to_thread(server.start)
            took = await settled(middleware)
            repeat = await post(client, key)
    finally:
        await store.close()
    if status == 200:
        assert repeat.headers["idempotent-replayed"] == "true"
        assert repeat.content == b"sent 1"
        assert app.executions == 1
    else:
        assert (repeat.status_code, repeat.content) == (200, b"sent 2")
        assert "idempotent-replayed" not in repeat.headers
        assert app.executions == 2
    print(f"\nthe retried write landed {took:.2f} s after Redis was restarted")


async def test_redis_down_longer_than_complete_retry(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    app = FaultyApp(server.kill)
    store = RedisStore.from_url(server.url, prefix=new_id())
    middleware = IdempotencyMiddleware(app, store=store, complete_retry=1.0)
    gauge = sample("relay_idem_pending_writes")
    timeouts = sample("relay_idem_writes_given_up_total", {"reason": "timeout"})
    try:
        async with through(middleware) as client:
            with caplog.at_level(logging.WARNING, logger="relay_idem"), Delta() as moved:
                assert (await post(client, new_id())).status_code == 200
                assert sample("relay_idem_pending_writes") == gauge + 1
                await settled(middleware)
    finally:
        await store.close()
    assert moved.moved == {"not_stored": 1}
    assert sample("relay_idem_writes_given_up_total", {"reason": "timeout"}) == timeouts + 1
    assert len(warnings(caplog, "could not store the outcome")) == 1
    assert len(warnings(caplog, "")) == 1
    assert sample("relay_idem_pending_writes") == gauge


async def test_a_newer_owner_took_the_key_during_the_outage(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Only this process loses Redis (a partition): its lease runs out, another process claims the key,
    and the late write is refused by the owner token once the partition heals."""
    prefix, key = new_id(), new_id()
    store_key = record_key(prefix, ANONYMOUS_SCOPE, key)
    with DelayProxy(server.port) as partition:
        app = FaultyApp(partition.cut)
        store = RedisStore.from_url(partition.url, prefix=prefix)
        other_process = RedisStore.from_url(server.url, prefix=prefix)
        middleware = IdempotencyMiddleware(app, store=store, lock_ttl=1)
        lease_lost = sample("relay_idem_lease_lost_total")
        try:
            async with through(middleware) as client:
                with caplog.at_level(logging.WARNING, logger="relay_idem"), Delta() as moved:
                    assert (await post(client, key)).status_code == 200
                    assert len(middleware.pending) == 1

                    async def claimed_by_another() -> bool:
                        return (await other_process.begin(store_key, b"newer owner", 60)).acquired

                    await wait_for(claimed_by_another, timeout=HANG_GUARD, what="the lease to run out")
                    partition.heal()
                    await settled(middleware)
            info = await other_process.get(store_key)
        finally:
            await store.close()
            await other_process.close()
    assert moved.moved == {"not_stored": 1}
    assert sample("relay_idem_lease_lost_total") == lease_lost + 1
    assert len(warnings(caplog, "lease lost")) == 1
    assert len(warnings(caplog, "")) == 1
    assert info is not None
    assert (info.record.fingerprint, info.record.response) == (b"newer owner", None)
    assert app.executions == 1


async def test_sigterm_waits_for_pending_writes_then_exits(
    server: RedisServer, upstream: str, client: httpx.AsyncClient
) -> None:
    """Two proxies, each with a write pending when Redis dies: the one with a 2 s window exits once it
    has given up; the other (2 workers) stays until Redis is back and its write has landed."""
    prefix = new_id()
    options = ("--redis", server.url, "--prefix", prefix)
    with (
        running_proxy(upstream, *options, "--complete-retry", "60", "--workers", "2") as (stays, stays_process),
        running_proxy(upstream, *options, "--complete-retry", "2") as (gives_up, gives_up_process),
    ):
        keys = {stays: new_id(), gives_up: new_id()}
        names = {stays: new_id(), gives_up: new_id()}

        async def work(proxy: str) -> httpx.Response:
            params = {"id": names[proxy], "seconds": "1"}
            return await client.post(f"{proxy}/work", params=params, content=MESSAGE, headers=keyed(keys[proxy]))

        requests = {proxy: asyncio.create_task(work(proxy)) for proxy in (stays, gives_up)}

        async def both_started() -> bool:
            for name in names.values():
                if (await client.get(f"{upstream}/calls", params={"id": name})).json()["started"] != 1:
                    return False
            return True

        await wait_for(both_started, timeout=HANG_GUARD, what="both upstream calls")
        server.kill()
        killed = time.monotonic()
        responses = {proxy: await request for proxy, request in requests.items()}
        assert {response.status_code for response in responses.values()} == {200}
        for proxy in (stays, gives_up):
            assert metric((await client.get(f"{proxy}/_relay/metrics")).text, "relay_idem_pending_writes") == 1

        stays_process.send_signal(signal.SIGTERM)
        gives_up_process.send_signal(signal.SIGTERM)

        async def gave_up_and_exited() -> bool:
            return gives_up_process.poll() is not None

        await wait_for(gave_up_and_exited, timeout=HANG_GUARD, what="the 2 s proxy to exit")
        assert time.monotonic() - killed >= 2.0  # it stayed for its whole window
        assert gives_up_process.returncode in CLEAN_EXIT
        assert stays_process.poll() is None  # still waiting for its own write

        await asyncio.to_thread(server.start)

        async def stored_and_exited() -> bool:
            return stays_process.poll() is not None

        await wait_for(stored_and_exited, timeout=HANG_GUARD, what="the 60 s proxy to exit")
        assert stays_process.returncode in CLEAN_EXIT
    store = RedisStore.from_url(server.url, prefix=prefix)
    try:
        stored = await store.get(record_key(prefix, ANONYMOUS_SCOPE, keys[stays]))
        given_up = await store.get(record_key(prefix, ANONYMOUS_SCOPE, keys[gives_up]))
    finally:
        await store.close()
    assert stored is not None and stored.record.response is not None
    assert stored.record.response.body == responses[stays].content  # written before that proxy exited
    assert given_up is None or given_up.record.response is None


async def test_redis_paused_while_a_functions_value_is_written(server: RedisServer) -> None:
    """SPEC §8.4 with §3.8: the caller gets its value, the write lands once Redis is back, and the next
    call gets the stored value: the function ran once."""
    store = RedisStore.from_url(server.url, prefix=new_id())
    runs = 0

    @idempotent(store, key=lambda job: f"reminder-{job}")
    async def send_reminder(job: int) -> str:
        nonlocal runs
        runs += 1
        if runs == 1:
            server.pause()  # Redis stops just before the value is written
        return f"msg_{runs}"

    outcomes = Outcomes()
    try:
        assert await send_reminder(1) == "msg_1"
        with pytest.raises(StoreUnavailable):  # still paused: nothing runs
            await send_reminder(1)
        server.resume()
        await asyncio.wait_for(send_reminder.drain(), HANG_GUARD)
        assert await send_reminder(1) == "msg_1"
    finally:
        server.resume()
        await store.close()
    assert runs == 1
    assert outcomes.counted() == {"executed": 1, "store_error": 1, "replayed": 1}


async def test_redis_cut_off_longer_than_a_functions_complete_retry(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The value is given up once (``not_stored``); once Redis is back and the claim has run out, the next
    call runs the function again."""
    with DelayProxy(server.port) as partition:
        store = RedisStore.from_url(partition.url, prefix=new_id())
        runs = 0

        @idempotent(store, key=lambda: "reminder", lock_ttl=1, complete_retry=1)
        async def send_reminder() -> str:
            nonlocal runs
            runs += 1
            if runs == 1:
                partition.cut()
            return f"msg_{runs}"

        outcomes = Outcomes()

        async def runs_again() -> bool:
            try:
                return await send_reminder() == "msg_2"
            except (KeyInProgress, StoreUnavailable):
                return False  # Redis not yet reachable, or the claim not yet run out

        try:
            with caplog.at_level(logging.WARNING, logger="relay_idem"):
                assert await send_reminder() == "msg_1"
                await asyncio.wait_for(send_reminder.drain(), HANG_GUARD)  # given up after complete_retry
                assert outcomes.counted() == {"not_stored": 1}
                partition.heal()
                await wait_for(runs_again, timeout=HANG_GUARD, what="the next call to run again")
        finally:
            partition.heal()
            await store.close()
    assert runs == 2
    counted = outcomes.counted()
    assert (counted["not_stored"], counted["executed"]) == (1, 1)
    assert len(warnings(caplog, "could not store the outcome")) == 1


def children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


async def test_a_killed_worker_no_longer_counts_in_the_pending_writes_gauge(
    server: RedisServer, upstream: str, client: httpx.AsyncClient
) -> None:
    """The gauge sums the live workers: a worker SIGKILLed with a write pending loses it (its claim runs
    out after lock_ttl), and once the proxy has replaced it, it counts no more."""
    with running_proxy(upstream, "--redis", server.url, "--prefix", new_id(), "--workers", "2") as (proxy, process):
        name = new_id()
        request = asyncio.create_task(
            client.post(f"{proxy}/work", params={"id": name, "seconds": "1"}, content=MESSAGE, headers=keyed(new_id()))
        )

        async def started() -> bool:
            return (await client.get(f"{upstream}/calls", params={"id": name})).json()["started"] == 1

        await wait_for(started, timeout=HANG_GUARD, what="the upstream call")
        server.kill()
        assert (await request).status_code == 200
        assert metric((await client.get(f"{proxy}/_relay/metrics")).text, "relay_idem_pending_writes") == 1
        workers = children(process.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(int(pid), signal.SIGKILL)

        async def replaced_and_counted_no_more() -> bool:
            try:
                text = (await client.get(f"{proxy}/_relay/metrics")).text
            except httpx.TransportError:
                return False
            return not set(children(process.pid)) & set(workers) and metric(text, "relay_idem_pending_writes") == 0

        await wait_for(replaced_and_counted_no_more, timeout=HANG_GUARD, what="the workers to be replaced")
