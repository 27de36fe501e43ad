"""Shared fixtures: the anyio backend, a real Redis, and the ``store`` parameter every contract test runs on."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis

from relay_idem import MemoryStore, RedisStore, Store
from relay_idem.store import notifier
from tests.apps import LONG_WAIT

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-url",
        default=os.environ.get("RELAY_IDEM_TEST_REDIS_URL", DEFAULT_REDIS_URL),
        help="a real Redis for the tests (RELAY_IDEM_REQUIRE_REDIS=1 makes its absence a failure)",
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def no_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiters on a RedisStore look at their key again only every LONG_WAIT s, not every 0.5 s: a wait
    with a LONG_WAIT timeout then ends before LONG_WAIT only by the store's notification."""
    monkeypatch.setattr(notifier, "POLL_INTERVAL", LONG_WAIT)


@pytest.fixture(scope="session")
def redis_url(pytestconfig: pytest.Config) -> Iterator[str]:
    """The real Redis the suite runs against; skipped without one, unless RELAY_IDEM_REQUIRE_REDIS=1."""
    url: str = pytestconfig.getoption("--redis-url")
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("RELAY_IDEM_REQUIRE_REDIS") == "1":
            pytest.fail(f"RELAY_IDEM_REQUIRE_REDIS=1 but no Redis answers at {url}: {exc}")
        pytest.skip(f"no Redis at {url}: {exc}")
    finally:
        client.close()
    yield url


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix, so tests sharing one Redis never see each other's records."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def store(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Store]:
    """Every store the contract holds for: MemoryStore, RedisStore on fakeredis, RedisStore on a real Redis."""
    if request.param == "memory":
        built: Store = MemoryStore(prefix=prefix)
    elif request.param == "fakeredis":
        import fakeredis

        built = RedisStore(fakeredis.FakeAsyncRedis(), prefix=prefix)
    else:
        built = RedisStore.from_url(request.getfixturevalue("redis_url"), prefix=prefix)
    yield built
    await built.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """The test upstream app (tests/proxy_upstream.py) under uvicorn, one per module, for proxy tests."""
    from tests.relay_processes import running_upstream

    with running_upstream() as url:
        yield url


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for tests that talk to real servers over loopback."""
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:
        yield client
