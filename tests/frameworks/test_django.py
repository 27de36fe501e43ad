"""Django (ASGI): the middleware wrapping ``get_asgi_application()``, as Django's docs wrap ASGI middleware.

The views write to a real sqlite database through Django's connection, behind Django's own
``CsrfViewMiddleware``: an API endpoint is ``@csrf_exempt``, and a view that is not refuses a
cookie-less POST with 403 — an answer the app gave, so it is final and replayed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import django
import httpx
import pytest
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.handlers.asgi import ASGIRequest
from django.db import connection, connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from relay_idem import IdempotencyMiddleware, Store
from tests.frameworks.shared import MESSAGE

pytestmark = pytest.mark.anyio


@csrf_exempt
def send_message(request: ASGIRequest) -> JsonResponse:
    """A synchronous view (Django runs it in a thread under ASGI) that writes one row per execution."""
    payload = json.loads(request.body)
    claim: dict[str, Any] | None = request.scope.get("extensions", {}).get("idempotency")
    token = claim["token"] if claim else None
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO message (recipient, claim_token) VALUES (%s, %s)", [payload["to"], token])
        message_id = cursor.lastrowid
    return JsonResponse({"id": f"msg_{message_id}", "to": payload["to"], "token": token}, status=202)


def protected(request: HttpRequest) -> HttpResponse:
    """Not CSRF-exempt: Django refuses a POST without the CSRF cookie and token before it gets here."""
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO message (recipient) VALUES ('protected')")
    return HttpResponse("created", status=201)


def message_count(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT recipient, claim_token FROM message ORDER BY id")
        rows = cursor.fetchall()
    return JsonResponse({"rows": rows})


urlpatterns = [
    path("v1/messages", send_message),
    path("v1/messages/rows", message_count),
    path("v1/protected", protected),
]


@pytest.fixture(scope="module")
def django_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Django settings are process-wide: configured once, with this module as the URLconf."""
    if not settings.configured:
        database = tmp_path_factory.mktemp("django") / "db.sqlite3"
        settings.configure(
            DEBUG=False,
            SECRET_KEY="relay-idem tests only",
            ALLOWED_HOSTS=["test"],
            ROOT_URLCONF=__name__,
            MIDDLEWARE=["django.middleware.common.CommonMiddleware", "django.middleware.csrf.CsrfViewMiddleware"],
            INSTALLED_APPS=[],
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(database)}},
            USE_TZ=True,
        )
        django.setup()
    yield
    connections.close_all()


@pytest.fixture
def table(django_settings: None) -> Iterator[None]:
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS message")
        cursor.execute("CREATE TABLE message (id INTEGER PRIMARY KEY, recipient TEXT, claim_token TEXT)")
    yield
    connection.close()


def client(store: Store, **options: Any) -> httpx.AsyncClient:
    application = IdempotencyMiddleware(get_asgi_application(), store=store, **options)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://test")


async def test_a_repeat_is_replayed_and_the_row_was_written_once(table: None, store: Store) -> None:
    async with client(store) as http:
        first = await http.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "pedido-42-lembrete"})
        again = await http.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "pedido-42-lembrete"})
        unkeyed = await http.post("/v1/messages", json=MESSAGE)
        rows = (await http.get("/v1/messages/rows")).json()["rows"]

    assert first.status_code == again.status_code == 202
    assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
    assert first.json()["id"] == "msg_1" and unkeyed.json()["id"] == "msg_2"
    # The view saw the claim, and kept its owner token with the row (a fencing token for an outbox).
    assert rows == [[MESSAGE["to"], first.json()["token"]], [MESSAGE["to"], None]]
    assert len(first.json()["token"]) >= 16


async def test_concurrent_duplicates_write_one_row(table: None, store: Store) -> None:
    headers = {"Idempotency-Key": "storm"}
    async with client(store, on_conflict="wait") as http:
        responses = await asyncio.gather(*(http.post("/v1/messages", json=MESSAGE, headers=headers) for _ in range(8)))
        rows = (await http.get("/v1/messages/rows")).json()["rows"]

    assert {response.status_code for response in responses} == {202}
    assert {response.content for response in responses} == {responses[0].content}
    assert len(rows) == 1


async def test_a_csrf_refusal_is_the_apps_final_answer_and_replayed(table: None, store: Store) -> None:
    async with client(store) as http:
        first = await http.post("/v1/protected", headers={"Idempotency-Key": "no-csrf"})
        again = await http.post("/v1/protected", headers={"Idempotency-Key": "no-csrf"})
        rows = (await http.get("/v1/messages/rows")).json()["rows"]

    assert first.status_code == again.status_code == 403
    assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
    assert rows == []


async def test_a_key_reused_with_another_body_is_refused_before_django_runs(table: None, store: Store) -> None:
    async with client(store) as http:
        first = await http.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "k"})
        other = await http.post(
            "/v1/messages", json={**MESSAGE, "to": "+5511000000000"}, headers={"Idempotency-Key": "k"}
        )
        rows = (await http.get("/v1/messages/rows")).json()["rows"]

    assert first.status_code == 202
    assert other.status_code == 422 and other.headers["content-type"] == "application/problem+json"
    assert len(rows) == 1
