"""Framework tests run on the memory store and on a real Redis (fakeredis is the contract suite's business)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from relay_idem import MemoryStore, RedisStore, Store


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Store]:
    if request.param == "memory":
        built: Store = MemoryStore(prefix=prefix)
    else:
        built = RedisStore.from_url(request.getfixturevalue("redis_url"), prefix=prefix)
    yield built
    await built.close()
