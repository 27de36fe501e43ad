"""The demo message API (``relay-idem demo``, SPEC §2): what a new user sees with the README's two curls."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from relay_idem.demo import build_demo_app
from tests.servers import free_port, serve

pytestmark = pytest.mark.anyio

MESSAGE = {
    "to": "+5511999998888",
    "template": "lembrete_consulta",
    "language": "pt_BR",
    "variables": {"1": "João Silva"},
}
ISO_8601_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Run the app's lifespan around the block (httpx.ASGITransport does not), so it closes its clients."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[str] = asyncio.Queue()

    async def send(message: dict[str, Any]) -> None:
        await outbox.put(message["type"])

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    assert await outbox.get() == "lifespan.startup.complete"
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        assert await outbox.get() == "lifespan.shutdown.complete"
        await task


@contextlib.asynccontextmanager
async def demo_client(**options: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = build_demo_app(**options)
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://demo.test") as client,
    ):
        yield client


async def test_a_retried_message_is_replayed_and_dispatched_once() -> None:
    async with demo_client() as client:
        headers = {"Idempotency-Key": "pedido-42-lembrete"}
        first = await client.post("/v1/messages", json=MESSAGE, headers=headers)
        retry = await client.post("/v1/messages", json=MESSAGE, headers=headers)
        stats = await client.get("/v1/stats")
        shown = await client.get(f"/v1/messages/{first.json()['id']}")
    assert first.status_code == 202
    assert set(first.json()) == {"id", "status", "queuedAt"}
    assert first.json()["id"].startswith("msg_")
    assert first.json()["status"] == "queued"
    assert re.fullmatch(ISO_8601_UTC, first.json()["queuedAt"])
    assert retry.status_code == 202
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == first.content
    assert stats.json() == {"dispatched": 1}
    assert shown.json() == {**MESSAGE, **first.json()}


async def test_a_message_needs_a_key() -> None:
    async with demo_client() as client:
        response = await client.post("/v1/messages", json=MESSAGE)
        stats = await client.get("/v1/stats")
    assert response.status_code == 400
    assert response.json()["type"].endswith("/key-required")
    assert stats.json() == {"dispatched": 0}


@pytest.mark.parametrize(
    ("body", "slug", "detail"),
    [
        (b"{not json", "demo/invalid-json", "JSON object"),
        (b"[1, 2]", "demo/invalid-message", "JSON object"),
        (b'{"to": "+5511999998888"}', "demo/invalid-message", "template"),
        (b'{"template": "t", "to": ""}', "demo/invalid-message", "to"),
    ],
)
async def test_invalid_messages_are_400_problems(body: bytes, slug: str, detail: str) -> None:
    async with demo_client() as client:
        response = await client.post("/v1/messages", content=body, headers={"Idempotency-Key": "k"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith(slug)
    assert detail in response.json()["detail"]


async def test_an_unknown_message_is_404() -> None:
    async with demo_client() as client:
        response = await client.get("/v1/messages/msg_nope")
        index = await client.get("/")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert "POST /v1/messages" in index.json()["endpoints"]


async def test_bare_serves_without_the_middleware() -> None:
    async with demo_client(bare=True) as client:
        first = await client.post("/v1/messages", json=MESSAGE)
        second = await client.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "ignored"})
        third = await client.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "ignored"})
        stats = await client.get("/v1/stats")
    assert {first.status_code, second.status_code, third.status_code} == {202}
    assert "idempotent-replayed" not in third.headers
    assert stats.json() == {"dispatched": 3}


async def test_demo_processes_on_one_redis_share_records_and_the_count(redis_url: str, prefix: str) -> None:
    headers = {"Idempotency-Key": "shared-key"}
    async with demo_client(redis=redis_url, prefix=prefix) as one, demo_client(redis=redis_url, prefix=prefix) as two:
        first = await one.post("/v1/messages", json=MESSAGE, headers=headers)
        retry = await two.post("/v1/messages", json=MESSAGE, headers=headers)
        other = await two.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "another"})
        shown = await two.get(f"/v1/messages/{first.json()['id']}")
        stats = await one.get("/v1/stats")
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == first.content
    assert other.json()["id"] != first.json()["id"]
    assert shown.json()["to"] == MESSAGE["to"]
    assert stats.json() == {"dispatched": 2}


@pytest.fixture(scope="module")
def demo_server() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serve(["relay_idem", "demo", "--port", str(port), "--log-level", "warning"], ready_url=f"{url}/v1/stats"):
        yield url


def test_the_readme_flow_against_a_real_demo_process(demo_server: str) -> None:
    """The README's two curl calls, as a new user runs them against `relay-idem demo`."""
    curl = {
        "headers": {"Content-Type": "application/json", "Idempotency-Key": "pedido-42-lembrete"},
        "content": (
            b'{"to": "+5511999998888", "template": "lembrete_consulta", '
            b'"language": "pt_BR", "variables": {"1": "Jo\\u00e3o Silva"}}'
        ),
    }
    with httpx.Client(base_url=demo_server) as client:
        first = client.post("/v1/messages", **curl)
        second = client.post("/v1/messages", **curl)
        stats = client.get("/v1/stats")
    assert first.status_code == second.status_code == 202
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert stats.json() == {"dispatched": 1}
