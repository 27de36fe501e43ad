"""The multiplexed connection under faults, against a private redis-server (DEBUG enabled)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis

from relay_idem.store.multiplexed import MultiplexedRedis, ResponseError
from relay_idem.store.scripts import LUA_BEGIN
from tests.redis_servers import RedisServer, free_port, start_standalone

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with start_standalone(config=["enable-debug-command yes"]) as server:
        yield server


def admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port)


async def test_evalsha_after_script_flush_reloads_the_script_and_retries(server: RedisServer) -> None:
    client = MultiplexedRedis(server.host, server.port, timeout=0.3)
    sha = client.register_script(LUA_BEGIN)
    admin(server).script_flush()
    assert await client.execute("EVALSHA", sha, 1, "k1", b"payload", b"tok", 10_000) is None
    assert await client.execute("EVALSHA", sha, 1, "k1", b"other", b"tok2", 10_000) == [b"tok", b"payload"]
    admin(server).script_flush()
    assert await client.execute_pipelined(("EVALSHA", sha, 1, "k2", b"p", b"t", 10_000), ("PING",)) == [None, b"PONG"]
    await client.aclose()


async def test_error_reply_raises_response_error(server: RedisServer) -> None:
    client = MultiplexedRedis(server.host, server.port)
    with pytest.raises(ResponseError):
        await client.execute("NOSUCHCOMMAND")
    assert await client.execute("PING") == b"PONG"
    await client.aclose()


async def test_every_reply_reaches_its_caller_when_a_third_are_cancelled_mid_flight(server: RedisServer) -> None:
    client = MultiplexedRedis(server.host, server.port, timeout=2.0)
    values = [str(n) for n in range(2000)]
    slow = asyncio.ensure_future(client.execute("DEBUG", "SLEEP", "0.1"))
    echoes = [asyncio.ensure_future(client.execute("ECHO", value)) for value in values]
    await asyncio.sleep(0.01)
    for echo in echoes[::3]:
        echo.cancel()
    await slow
    for value, echo in zip(values, echoes, strict=True):
        if not echo.cancelled():
            assert await echo == value.encode()
    assert await client.execute("ECHO", "after") == b"after"
    await client.aclose()


async def test_a_late_call_times_out_fails_those_behind_it_and_the_next_call_reconnects(server: RedisServer) -> None:
    client = MultiplexedRedis(server.host, server.port, timeout=0.3)
    slow = asyncio.ensure_future(client.execute("DEBUG", "SLEEP", "0.6"))
    behind = [asyncio.ensure_future(client.execute("ECHO", "y")) for _ in range(50)]
    with pytest.raises(TimeoutError):
        await slow
    outcomes = await asyncio.gather(*behind, return_exceptions=True)
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
    await asyncio.sleep(0.5)  # DEBUG SLEEP ends on the server
    assert await client.execute("PING") == b"PONG"
    await client.aclose()


async def test_a_killed_connection_fails_every_pending_call_and_the_next_call_reconnects(
    server: RedisServer,
) -> None:
    client = MultiplexedRedis(server.host, server.port, timeout=2.0)
    pending = [asyncio.ensure_future(client.execute("BLPOP", "nothing", "0.5"))]
    pending += [asyncio.ensure_future(client.execute("ECHO", "z")) for _ in range(20)]
    await asyncio.sleep(0.05)
    admin(server).client_kill_filter(_type="normal", skipme=True)
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
    assert await client.execute("PING") == b"PONG"
    await client.aclose()


async def test_nothing_listening_raises_connection_error() -> None:
    client = MultiplexedRedis("127.0.0.1", free_port(), timeout=0.3)
    with pytest.raises(ConnectionError):
        await client.execute("PING")
