"""FastAPI: the middleware mounted with ``app.add_middleware``, as FastAPI's docs mount ASGI middleware.

FastAPI's sharp edges: ``BackgroundTasks`` run after the response (once, never on a replay),
``StreamingResponse`` bodies of unknown length, dependencies that read the claim from the scope,
``HTTPException`` turned into a response inside the app, an unhandled exception that FastAPI's
``ServerErrorMiddleware`` (outside ours) re-raises, and FastAPI's own 422 beside ours.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from relay_idem import IdempotencyMiddleware, Store
from tests.frameworks.shared import MESSAGE, Sent, export_body, export_rows

pytestmark = pytest.mark.anyio


class Message(BaseModel):
    to: str
    template: str


def claim_of(request: Request) -> dict[str, Any] | None:
    """A dependency: the claim relay-idem put in the scope (SPEC §3.6), None on a request without a key."""
    claim: dict[str, Any] | None = request.scope.get("extensions", {}).get("idempotency")
    return claim


def build_app(store: Store, **options: Any) -> tuple[FastAPI, Sent]:
    sent = Sent()
    app = FastAPI()

    @app.post("/v1/messages", status_code=202)
    async def send_message(
        message: Message,
        background: BackgroundTasks,
        claim: Annotated[dict[str, Any] | None, Depends(claim_of)],
    ) -> dict[str, Any]:
        message_id = f"msg_{len(sent.messages) + 1}"
        sent.messages.append(message_id)
        background.add_task(sent.notified.append, message_id)
        return {"id": message_id, "to": message.to, "claim": claim}

    @app.post("/v1/exports")
    async def export() -> StreamingResponse:
        sent.streams += 1
        return StreamingResponse(export_rows(sent.streams), media_type="text/csv")

    @app.post("/v1/payments")
    async def pay(amount: int) -> dict[str, int]:
        sent.messages.append(f"payment {amount}")
        if amount > 100:
            raise HTTPException(status_code=402, detail="insufficient funds")
        if amount == 0:
            raise HTTPException(status_code=429, detail="slow down", headers={"Retry-After": "3"})
        return {"paid": amount}

    @app.post("/v1/crash")
    async def crash() -> None:
        sent.failures += 1
        raise RuntimeError("the handler crashed")

    app.add_middleware(IdempotencyMiddleware, store=store, **options)
    return app, sent


def client(app: FastAPI) -> httpx.AsyncClient:
    # raise_app_exceptions=False: the client sees what a server would send for an app that raised.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_a_repeat_is_replayed_and_its_background_task_ran_once(store: Store) -> None:
    app, sent = build_app(store)
    async with client(app) as http:
        first = await http.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "pedido-42-lembrete"})
        again = await http.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "pedido-42-lembrete"})
        other = await http.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "pedido-43-lembrete"})

    assert first.status_code == again.status_code == 202
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert first.json()["id"] == "msg_1" and other.json()["id"] == "msg_2"
    assert sent.messages == ["msg_1", "msg_2"]
    # The background task runs after the response, in the executed request only.
    assert sent.notified == ["msg_1", "msg_2"]


async def test_concurrent_duplicates_execute_once_and_all_get_the_response(store: Store) -> None:
    app, sent = build_app(store, on_conflict="wait")
    headers = {"Idempotency-Key": "storm"}
    async with client(app) as http:
        responses = await asyncio.gather(*(http.post("/v1/messages", json=MESSAGE, headers=headers) for _ in range(8)))

    assert {response.status_code for response in responses} == {202}
    assert {response.content for response in responses} == {responses[0].content}
    assert sum(response.headers.get("idempotent-replayed") == "true" for response in responses) == 7
    assert sent.messages == sent.notified == ["msg_1"]


async def test_a_dependency_reads_the_claim_from_the_scope(store: Store) -> None:
    app, _ = build_app(store)
    async with client(app) as http:
        keyed = await http.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "k-1"})
        replayed = await http.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "k-1"})
        unkeyed = await http.post("/v1/messages", json=MESSAGE)

    claim = keyed.json()["claim"]
    assert claim["key"] == "k-1"
    assert claim["scope"] == "anonymous"
    assert isinstance(claim["token"], str) and len(claim["token"]) >= 16
    assert replayed.json()["claim"] == claim  # the replay is the first response, token included
    assert unkeyed.json()["claim"] is None


async def test_a_streaming_response_reaches_the_client_and_is_replayed_whole(store: Store) -> None:
    app, sent = build_app(store)
    async with client(app) as http:
        first = await http.post("/v1/exports", headers={"Idempotency-Key": "export-1"})
        again = await http.post("/v1/exports", headers={"Idempotency-Key": "export-1"})

    assert first.status_code == again.status_code == 200
    assert first.content == again.content == export_body(1)
    assert again.headers["content-type"] == first.headers["content-type"] == "text/csv; charset=utf-8"
    assert again.headers["idempotent-replayed"] == "true"
    assert sent.streams == 1


async def test_an_http_exception_is_a_final_answer_and_replayed(store: Store) -> None:
    app, sent = build_app(store)
    async with client(app) as http:
        first = await http.post("/v1/payments", params={"amount": 500}, headers={"Idempotency-Key": "pay-1"})
        again = await http.post("/v1/payments", params={"amount": 500}, headers={"Idempotency-Key": "pay-1"})

    assert first.status_code == again.status_code == 402
    assert first.json() == again.json() == {"detail": "insufficient funds"}
    assert again.headers["idempotent-replayed"] == "true"
    assert sent.messages == ["payment 500"]


async def test_an_http_exception_429_releases_the_key_so_the_retry_executes(store: Store) -> None:
    app, sent = build_app(store)
    async with client(app) as http:
        first = await http.post("/v1/payments", params={"amount": 0}, headers={"Idempotency-Key": "pay-0"})
        again = await http.post("/v1/payments", params={"amount": 0}, headers={"Idempotency-Key": "pay-0"})

    assert first.status_code == again.status_code == 429
    assert first.headers["retry-after"] == "3"
    assert "idempotent-replayed" not in again.headers
    assert sent.messages == ["payment 0", "payment 0"]


async def test_an_unhandled_exception_is_stored_as_a_500_and_replayed(store: Store) -> None:
    app, sent = build_app(store)
    async with client(app) as http:
        first = await http.post("/v1/crash", headers={"Idempotency-Key": "crash-1"})
        again = await http.post("/v1/crash", headers={"Idempotency-Key": "crash-1"})
        unkeyed = await http.post("/v1/crash")

    assert first.status_code == again.status_code == 500
    assert first.headers["content-type"] == "application/problem+json"
    assert first.json()["type"].endswith("/app-error")
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    # Without a key, FastAPI's own ServerErrorMiddleware answers: relay-idem stays out of it.
    assert unkeyed.status_code == 500 and unkeyed.headers["content-type"].startswith("text/plain")
    assert sent.failures == 2


async def test_fastapi_validation_422_is_final_and_a_fixed_body_needs_a_new_key(store: Store) -> None:
    """FastAPI's 422 means the app looked at the request and refused it: final, like any 4xx.

    A client that fixes its body and retries with the same key gets relay-idem's own 422
    (key-reused, problem+json), which a client tells from FastAPI's by its content type.
    """
    app, sent = build_app(store)
    headers = {"Idempotency-Key": "bad-body"}
    async with client(app) as http:
        invalid = await http.post("/v1/messages", json={"to": "+5511999998888"}, headers=headers)
        repeated = await http.post("/v1/messages", json={"to": "+5511999998888"}, headers=headers)
        fixed = await http.post("/v1/messages", json=MESSAGE, headers=headers)

    assert invalid.status_code == repeated.status_code == fixed.status_code == 422
    assert invalid.headers["content-type"] == "application/json"
    assert repeated.content == invalid.content and repeated.headers["idempotent-replayed"] == "true"
    assert fixed.headers["content-type"] == "application/problem+json"
    assert fixed.json()["type"].endswith("/key-reused")
    assert sent.messages == []
