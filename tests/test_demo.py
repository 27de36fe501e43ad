"""The demo message API (``relay-idem demo``, SPEC §2): what a new user sees with the README's two curls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_idem.demo import build_demo_app
from tests.apps import Result, call
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
        # Issue 12: these were 500 text/plain (RecursionError, or JSON that cannot be sent back), replayed.
        # Nesting deeper than the parser's recursion on every tested Python: 3.13 parses 5,000 levels.
        (b"[" * 100_000, "demo/invalid-json", "JSON object"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "demo/invalid-json", "JSON object"),
        (b'{"to": "+1", "template": "t", "variables": {"1": 1e999}}', "demo/invalid-json", "JSON object"),
        (b'{"to": "+1", "template": "t", "variables": {"1": NaN}}', "demo/invalid-json", "JSON object"),
        (b'{"to": "\\ud800", "template": "t"}', "demo/invalid-json", "JSON object"),
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


# --- fuzzing: no input gets a 5xx from the demo (issue 12) -------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
# Texts a JSON parser accepts but that cannot be sent back as JSON: non-finite numbers and lone surrogates.
awkward_values = st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-Infinity", '"\\ud800"', '"a\\udfffb"'])
nesting = st.integers(min_value=1, max_value=20_000)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.builds(
        lambda to, template, variables: json.dumps({"to": to, "template": template, "variables": variables}).encode(),
        st.text(min_size=1, max_size=10),
        st.text(min_size=1, max_size=10),
        json_values,
    ),
    awkward_values.map(lambda value: b'{"to": "+1", "template": "t", "variables": {"1": ' + value.encode() + b"}}"),
    awkward_values.map(lambda value: b'{"to": ' + value.encode() + b', "template": "t"}'),
    nesting.map(lambda depth: b"[" * depth),
    nesting.map(lambda depth: b"[" * depth + b"]" * depth),
    nesting.map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    nesting.map(lambda depth: b'{"to": "+1", "template": "t", "variables": ' + b"[" * depth + b"]" * depth + b"}"),
)
header_names = st.sampled_from(
    [b"idempotency-key", b"content-type", b"content-length", b"authorization", b"accept", b"x-other"]
) | st.binary(min_size=1, max_size=12)
fuzz_headers = st.lists(st.tuples(header_names, st.binary(max_size=40)), max_size=5)
message_ids = st.text(max_size=30).filter(lambda text: "/" not in text)


def demo_problem(result: Result) -> bool:
    return result.header(b"content-type") == b"application/problem+json" and "type" in result.json()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, headers=fuzz_headers, keyed=st.booleans(), message_id=message_ids)
def test_no_body_or_header_gets_a_5xx_from_the_demo(
    body: bytes, headers: list[tuple[bytes, bytes]], keyed: bool, message_id: str
) -> None:
    """Arbitrary bytes, JSON, deeply nested JSON (`[` x 5,000 was a 500 RecursionError, replayed for
    the key) and arbitrary headers: every answer is below 500, every error a problem+json, and every
    message the demo accepted can be shown again."""
    app = build_demo_app()
    if keyed:
        headers = [*headers, (b"idempotency-key", b"fuzz-key")]

    async def exercise() -> list[Result]:
        first = await call(app, path="/v1/messages", headers=headers, body=body)
        repeat = await call(app, path="/v1/messages", headers=headers, body=body)
        results = [first, repeat, await call(app, method="GET", path=f"/v1/messages/{message_id}")]
        if first.status == 202:
            results.append(await call(app, method="GET", path=f"/v1/messages/{first.json()['id']}"))
            assert results[-1].status == 200
        return results

    for result in asyncio.run(exercise()):
        assert result.status < 500, (result.status, result.body[:200])
        assert result.status < 400 or demo_problem(result), (result.status, result.headers, result.body[:200])
