"""Redis stopped mid-test: 503 problem+json (or pass-through with on_store_error="open"), and
service resumes by itself when the same server comes back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from relay_idem import IdempotencyMiddleware, RedisStore
from tests.redis_servers import RedisServer, start_standalone

pytestmark = pytest.mark.slow


class CountingApp:
    """Answers 200 and counts how often it really ran."""

    def __init__(self) -> None:
        self.executions = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.executions += 1
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"sent %d" % self.executions})


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with start_standalone() as server:
        yield server


async def post(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post("/v1/messages", content=b'{"to": "+5511999998888"}', headers={"Idempotency-Key": key})


@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["closed", "open"])
async def test_store_outage_follows_on_store_error_and_recovers_when_redis_returns(
    server: RedisServer, policy: str
) -> None:
    app = CountingApp()
    store = RedisStore.from_url(server.url, prefix="outage")
    middleware = IdempotencyMiddleware(app, store=store, on_store_error=policy)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(middleware), base_url="http://test") as client:
        before = await post(client, "before-outage")
        assert before.status_code == 200

        server.kill()
        during = await post(client, f"during-{uuid.uuid4().hex}")
        if policy == "closed":
            assert during.status_code == 503
            assert during.headers["content-type"] == "application/problem+json"
            assert int(during.headers["retry-after"]) >= 1
            assert during.json()["type"].endswith("/store-unavailable")
            assert app.executions == 1
        else:
            assert during.status_code == 200
            assert app.executions == 2

        server.restart()
        after = await post(client, "after-outage")
        assert after.status_code == 200
        assert "idempotent-replayed" not in after.headers
        replay = await post(client, "after-outage")
        assert replay.headers["idempotent-replayed"] == "true"
    await store.close()
