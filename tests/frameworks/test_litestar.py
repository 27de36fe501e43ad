"""Litestar: the middleware in Litestar's ``middleware`` list, as ``DefineMiddleware`` or as a callable.

Litestar's sharp edge: it builds its middleware stack once per route, after routing, so every
route handler gets its own ``IdempotencyMiddleware``. They must share one store, passed in
explicitly: a key reused on another route is then a mismatch (422), as SPEC §3.1 wants.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

import httpx
import pytest
from litestar import Litestar, Response, post
from litestar.background_tasks import BackgroundTask
from litestar.enums import RequestEncodingType
from litestar.middleware import DefineMiddleware
from litestar.params import Body
from litestar.response import Stream
from litestar.types import ASGIApp

from relay_idem import IdempotencyMiddleware, Store
from tests.frameworks.shared import MESSAGE, Sent, export_body, export_rows

pytestmark = pytest.mark.anyio


def define(store: Store) -> DefineMiddleware:
    return DefineMiddleware(IdempotencyMiddleware, store=store)


def factory(store: Store) -> Callable[[ASGIApp], ASGIApp]:
    # Litestar calls each entry of its middleware list with the keyword argument ``app``.
    def idempotency(app: ASGIApp) -> ASGIApp:
        return IdempotencyMiddleware(app, store=store)

    return idempotency


JSONBody = Annotated[dict[str, Any], Body(media_type=RequestEncodingType.JSON)]
Mount = Callable[[Store], Any]
MOUNTS: dict[str, Mount] = {"DefineMiddleware": define, "callable": factory}


def build_app(mount: Mount, store: Store) -> tuple[Litestar, Sent]:
    sent = Sent()

    async def notify(message_id: str) -> None:
        sent.notified.append(message_id)

    @post("/v1/messages", status_code=202)
    async def send_message(
        data: Annotated[dict[str, Any], Body(media_type=RequestEncodingType.JSON)],
    ) -> Response[dict[str, Any]]:
        message_id = f"msg_{len(sent.messages) + 1}"
        sent.messages.append(message_id)
        body = {"id": message_id, "to": data["to"]}
        return Response(body, status_code=202, background=BackgroundTask(notify, message_id))

    @post("/v1/exports")
    async def export() -> Stream:
        sent.streams += 1
        return Stream(export_rows(sent.streams), media_type="text/csv")

    app = Litestar(route_handlers=[send_message, export], middleware=[mount(store)])
    return app, sent


def client(app: Litestar) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize("mount", MOUNTS.values(), ids=MOUNTS.keys())
async def test_a_repeat_is_replayed_and_its_background_task_ran_once(
    mount: Callable[[Store], Any], store: Store
) -> None:
    app, sent = build_app(mount, store)
    async with client(app) as http:
        first = await http.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "pedido-42-lembrete"})
        again = await http.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "pedido-42-lembrete"})
        other = await http.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "pedido-43-lembrete"})

    assert first.status_code == again.status_code == 202
    assert again.content == first.content and first.json()["id"] == "msg_1"
    assert again.headers["idempotent-replayed"] == "true"
    assert other.json()["id"] == "msg_2"
    assert sent.messages == sent.notified == ["msg_1", "msg_2"]


@pytest.mark.parametrize("mount", MOUNTS.values(), ids=MOUNTS.keys())
async def test_a_streamed_response_is_replayed_whole(mount: Mount, store: Store) -> None:
    app, sent = build_app(mount, store)
    async with client(app) as http:
        first = await http.post("/v1/exports", headers={"Idempotency-Key": "export-1"})
        again = await http.post("/v1/exports", headers={"Idempotency-Key": "export-1"})

    assert first.status_code == again.status_code == 201
    assert first.content == again.content == export_body(1)
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["idempotent-replayed"] == "true"
    assert sent.streams == 1


async def test_concurrent_duplicates_execute_once(store: Store) -> None:
    app, sent = build_app(lambda store: DefineMiddleware(IdempotencyMiddleware, store=store, on_conflict="wait"), store)
    headers = {"Idempotency-Key": "storm"}
    async with client(app) as http:
        responses = await asyncio.gather(*(http.post("/v1/messages", json=MESSAGE, headers=headers) for _ in range(8)))

    assert {response.status_code for response in responses} == {202}
    assert {response.content for response in responses} == {responses[0].content}
    assert sent.messages == sent.notified == ["msg_1"]


async def test_routes_share_the_store_so_a_key_reused_on_another_route_is_a_mismatch(store: Store) -> None:
    app, sent = build_app(define, store)
    async with client(app) as http:
        message = await http.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "shared"})
        export = await http.post("/v1/exports", headers={"Idempotency-Key": "shared"})

    assert message.status_code == 202
    assert export.status_code == 422 and export.json()["type"].endswith("/key-reused")
    assert sent.streams == 0
