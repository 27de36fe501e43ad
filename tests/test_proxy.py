"""The proxy app in this process: header rewriting, the outcome of upstream failures, ``/_relay/``.

Upstream failures are real: both clients talk to sockets this test opens (refused, reset, silent).
The proxy as a separate process, in front of a real upstream, is ``test_proxy_processes.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from relay_idem import MemoryStore
from relay_idem.config import Config
from relay_idem.exceptions import StoreUnavailable
from relay_idem.proxy import build_proxy_app, forwarded_headers, request_body, request_target
from relay_idem.upstream import (
    UPSTREAM_CLIENTS,
    RawHeaders,
    RequestBody,
    Upstream,
    UpstreamBroken,
    UpstreamTimeout,
    UpstreamUnreachable,
    open_upstream,
)
from tests.servers import free_port

pytestmark = pytest.mark.anyio

MESSAGE = b'{"to": "+5511999998888", "template": "lembrete_consulta"}'


class Response:
    def __init__(self, status: int, headers: RawHeaders, chunks: list[bytes]) -> None:
        self.status = status
        self.headers = headers
        self.chunks = chunks
        self.closed = False
        self.complete = False

    async def body(self) -> AsyncIterator[bytes]:
        for index, chunk in enumerate(self.chunks):
            self.complete = index == len(self.chunks) - 1
            yield chunk

    def arrived_whole(self) -> None:
        return None  # streamed, chunk by chunk: the path a body still arriving takes

    async def close(self) -> None:
        self.closed = True


class FakeUpstream:
    """Answers with ``outcomes`` in turn: a Response, or an exception to raise; records what it was sent."""

    def __init__(self, *outcomes: Response | Exception) -> None:
        self.outcomes = list(outcomes)
        self.sent: list[tuple[str, str, RawHeaders, bytes]] = []
        self.closed = False

    async def send(self, method: str, target: str, headers: RawHeaders, body: RequestBody) -> Response:
        data = body if isinstance(body, bytes) else b"".join([chunk async for chunk in body]) if body else b""
        self.sent.append((method, target, headers, data))
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def close(self) -> None:
        self.closed = True


def ok(body: bytes = b'{"id": "msg_1"}') -> Response:
    return Response(202, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], [body])


def proxy_client(upstream: Upstream, store: Any = None, **options: Any) -> httpx.AsyncClient:
    config = Config(upstream="http://upstream.test", **options)
    app = build_proxy_app(config, store=store if store is not None else MemoryStore(), upstream=upstream)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy.test")


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key, "Content-Type": "application/json"}


def http_scope(headers: RawHeaders, **extra: Any) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/v1/messages", "headers": headers, "query_string": b"", **extra}


# --- what goes to the upstream ---------------------------------------------------------------


def test_forwarded_headers_drop_hop_by_hop_and_add_x_forwarded() -> None:
    scope = http_scope(
        [
            (b"host", b"api.example.com"),
            (b"connection", b"keep-alive, x-secret-hop"),
            (b"x-secret-hop", b"1"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"trailers"),
            (b"x-forwarded-for", b"203.0.113.7"),
            (b"x-forwarded-for", b"10.0.0.2"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"spoofed.example"),
            (b"expect", b"100-continue"),
            (b"authorization", b"Bearer t"),
            (b"accept", b"a"),
            (b"accept", b"b"),
        ],
        client=("192.0.2.1", 50000),
        scheme="http",
    )
    assert forwarded_headers(scope) == [
        (b"authorization", b"Bearer t"),
        (b"accept", b"a"),
        (b"accept", b"b"),
        (b"x-forwarded-for", b"203.0.113.7, 10.0.0.2, 192.0.2.1"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"api.example.com"),
    ]


def test_forwarded_headers_without_client_or_host() -> None:
    assert forwarded_headers(http_scope([], scheme="https")) == [(b"x-forwarded-proto", b"https")]


def test_request_target_keeps_the_raw_path_and_query() -> None:
    scope = http_scope([], path="/a b", raw_path=b"/a%20b/%2F", query_string=b"x=1&y=%20")
    assert request_target(scope) == "/a%20b/%2F?x=1&y=%20"
    assert request_target(http_scope([], path="/plain")) == "/plain"


async def test_request_body_whole_or_streamed() -> None:
    async def one() -> dict[str, Any]:
        return {"type": "http.request", "body": b"whole", "more_body": False}

    assert await request_body(one) == b"whole"

    messages = iter([{"type": "http.request", "body": b"a", "more_body": True}, {"type": "http.request", "body": b"b"}])

    async def several() -> dict[str, Any]:
        return next(messages)

    body = await request_body(several)
    assert not isinstance(body, bytes | None)
    assert [chunk async for chunk in body] == [b"a", b"b"]


async def test_the_upstream_gets_method_target_headers_and_body() -> None:
    upstream = FakeUpstream(ok())
    async with proxy_client(upstream) as client:
        response = await client.patch("/v1/messages/7?dry=1", content=b"{}", headers={"Idempotency-Key": "k"})
    assert response.status_code == 202
    method, target, headers, body = upstream.sent[0]
    assert (method, target, body) == ("PATCH", "/v1/messages/7?dry=1", b"{}")
    assert (b"idempotency-key", b"k") in headers
    assert (b"x-forwarded-host", b"proxy.test") in headers
    assert not any(name == b"host" for name, _ in headers)


async def test_response_headers_lose_hop_by_hop_and_keep_duplicates() -> None:
    headers = [
        (b"set-cookie", b"a=1"),
        (b"connection", b"x-hop"),
        (b"x-hop", b"1"),
        (b"transfer-encoding", b"chunked"),
        (b"set-cookie", b"b=2"),
    ]
    async with proxy_client(FakeUpstream(Response(200, headers, [b"x", b"y"]))) as client:
        response = await client.get("/page")
    assert response.headers.multi_items() == [("set-cookie", "a=1"), ("set-cookie", "b=2")]
    assert response.content == b"xy"


async def test_the_last_chunk_ends_the_response_without_an_empty_message() -> None:
    app = build_proxy_app(Config(upstream="http://upstream.test"), store=MemoryStore(), upstream=FakeUpstream(ok()))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(http_scope([], method="GET", client=("127.0.0.1", 1), scheme="http"), receive, send)
    bodies = [(m["body"], m["more_body"]) for m in sent if m["type"] == "http.response.body"]
    assert bodies == [(b'{"id": "msg_1"}', False)]


# --- upstream failures and the outcome policy (SPEC §3.6, §3.7) --------------------------------


async def test_unreachable_upstream_is_502_and_releases_the_key() -> None:
    upstream = FakeUpstream(UpstreamUnreachable("refused"), ok())
    async with proxy_client(upstream) as client:
        failed = await client.post("/v1/messages", content=MESSAGE, headers=keyed("retry-me"))
        executed = await client.post("/v1/messages", content=MESSAGE, headers=keyed("retry-me"))
        replayed = await client.post("/v1/messages", content=MESSAGE, headers=keyed("retry-me"))
    assert failed.status_code == 502
    assert failed.headers["content-type"] == "application/problem+json"
    assert failed.json()["type"].endswith("/upstream-unreachable")
    assert executed.status_code == 202
    assert "idempotent-replayed" not in executed.headers
    assert replayed.headers["idempotent-replayed"] == "true"
    assert len(upstream.sent) == 2


@pytest.mark.parametrize(
    ("error", "status", "slug"),
    [(UpstreamTimeout("slow"), 504, "upstream-timeout"), (UpstreamBroken("reset"), 502, "upstream-failed")],
)
async def test_upstream_failure_after_sending_is_final(error: Exception, status: int, slug: str) -> None:
    upstream = FakeUpstream(error, ok())
    async with proxy_client(upstream) as client:
        first = await client.post("/v1/messages", content=MESSAGE, headers=keyed("maybe-sent"))
        repeat = await client.post("/v1/messages", content=MESSAGE, headers=keyed("maybe-sent"))
    assert first.status_code == status
    assert first.json()["type"].endswith(slug)
    assert repeat.status_code == status
    assert repeat.headers["idempotent-replayed"] == "true"
    assert repeat.content == first.content
    assert len(upstream.sent) == 1


async def test_unreachable_without_a_key_is_just_502() -> None:
    async with proxy_client(FakeUpstream(UpstreamUnreachable("refused"))) as client:
        response = await client.get("/anything")
    assert response.status_code == 502


class BreaksOff(Response):
    async def body(self) -> AsyncIterator[bytes]:
        yield b"partial"
        raise UpstreamBroken("reset mid-body")


async def test_a_body_that_breaks_off_leaves_the_response_unfinished_and_final() -> None:
    store = MemoryStore()
    upstream = FakeUpstream(BreaksOff(200, [], []))
    config = Config(upstream="http://upstream.test")
    app = build_proxy_app(config, store=store, upstream=upstream)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": MESSAGE}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"idempotency-key", b"broken"), (b"host", b"proxy.test")]
    await app(http_scope(headers, client=("127.0.0.1", 1), scheme="http"), receive, send)
    assert [m.get("more_body") for m in sent if m["type"] == "http.response.body"] == [True]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy.test") as client:
        repeat = await client.post("/v1/messages", content=MESSAGE, headers={"Idempotency-Key": "broken"})
    assert repeat.status_code == 500
    assert repeat.headers["idempotent-body-omitted"] == "true"
    assert len(upstream.sent) == 1


# --- the real clients against real sockets -----------------------------------------------------


@contextlib.asynccontextmanager
async def raw_server(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]) -> AsyncIterator[str]:
    """A TCP server on a free port that does whatever ``handle`` does with each connection."""
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await handle(reader, writer)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()


async def reset_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.transport.abort()


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.sleep(5)


async def answer_then_stop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Kept: 1\r\nKeep-Alive: timeout=5\r\n\r\nonly 14 bytes.")
    await writer.drain()
    writer.transport.abort()


@pytest.mark.parametrize("client", UPSTREAM_CLIENTS)
async def test_refused_connection_is_unreachable(client: str) -> None:
    upstream = open_upstream(client, f"http://127.0.0.1:{free_port()}", timeout=2)  # type: ignore[arg-type]
    try:
        with pytest.raises(UpstreamUnreachable):
            await upstream.send("POST", "/v1/messages", [], MESSAGE)
    finally:
        await upstream.close()


@pytest.mark.parametrize("client", UPSTREAM_CLIENTS)
async def test_reset_after_sending_is_broken(client: str) -> None:
    async with raw_server(reset_after_request) as url:
        upstream = open_upstream(client, url, timeout=2)  # type: ignore[arg-type]
        try:
            with pytest.raises(UpstreamBroken):
                await upstream.send("POST", "/v1/messages", [(b"content-length", b"2")], b"{}")
        finally:
            await upstream.close()


@pytest.mark.parametrize("client", UPSTREAM_CLIENTS)
async def test_no_response_headers_in_time_is_a_timeout(client: str) -> None:
    async with raw_server(never_answer) as url:
        upstream = open_upstream(client, url, timeout=0.3)  # type: ignore[arg-type]
        try:
            with pytest.raises(UpstreamTimeout):
                await upstream.send("POST", "/v1/messages", [], MESSAGE)
        finally:
            await upstream.close()


@pytest.mark.parametrize("client", UPSTREAM_CLIENTS)
async def test_a_short_body_breaks_off(client: str) -> None:
    async with raw_server(answer_then_stop) as url:
        upstream = open_upstream(client, url, timeout=2)  # type: ignore[arg-type]
        try:
            response = await upstream.send("GET", "/", [], None)
            assert response.status == 200
            assert (b"x-kept", b"1") in response.headers
            chunks = []
            with pytest.raises(UpstreamBroken):
                async for chunk in response.body():
                    chunks.append(chunk)
            assert b"".join(chunks) == b"only 14 bytes."
            await response.close()
        finally:
            await upstream.close()


@pytest.mark.parametrize("client", UPSTREAM_CLIENTS)
async def test_clients_add_no_headers_and_keep_no_cookies_of_their_own(client: str) -> None:
    seen: list[bytes] = []
    big = b"b" * 10_000  # over aiohttp's 8 KiB default for one header

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # keep-alive: one connection, several requests
            try:
                seen.append(await reader.readuntil(b"\r\n\r\n"))
            except asyncio.IncompleteReadError:
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\nSet-Cookie: session=secret\r\nX-Big: " + big + b"\r\n"
                b"Content-Encoding: gzip\r\nContent-Length: 4\r\n\r\n\x1f\x8b\x00\x00"
            )
            await writer.drain()

    async with raw_server(record) as url:
        upstream = open_upstream(client, url, timeout=2)  # type: ignore[arg-type]
        try:
            bodies = []
            for _ in range(2):
                response = await upstream.send("GET", "/x?a=%20", [(b"x-mine", b"1")], None)
                assert (b"x-big", big) in response.headers
                bodies.append(b"".join([chunk async for chunk in response.body()]))
                await response.close()
        finally:
            await upstream.close()
    assert len(seen) == 2
    for request in seen:
        request_line, *header_lines = request.decode().strip().split("\r\n")
        assert request_line == "GET /x?a=%20 HTTP/1.1"
        # No User-Agent, Accept-Encoding, ... and no Cookie remembered from the first response.
        assert sorted(line.split(":")[0].lower() for line in header_lines) == ["host", "x-mine"]
    assert bodies == [b"\x1f\x8b\x00\x00"] * 2  # passed on as sent, never decompressed


@pytest.mark.parametrize("client", UPSTREAM_CLIENTS)
async def test_an_upstream_url_with_a_path_prefixes_every_target(client: str) -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    async with raw_server(record) as url:
        upstream = open_upstream(client, f"{url}/api/", timeout=2)  # type: ignore[arg-type]
        try:
            response = await upstream.send("DELETE", "/v1/messages/7", [], None)
            assert response.status == 204
            await response.close()
        finally:
            await upstream.close()
    assert seen[0].startswith(b"DELETE /api/v1/messages/7 HTTP/1.1\r\n")


# --- the proxy's own endpoints -------------------------------------------------------------------


class DownStore(MemoryStore):
    async def ping(self) -> None:
        raise StoreUnavailable("ConnectionError: refused")


async def test_healthz_readyz_metrics() -> None:
    async with proxy_client(FakeUpstream(ok())) as client:
        health = await client.get("/_relay/healthz")
        ready = await client.get("/_relay/readyz")
        metrics = await client.get("/_relay/metrics")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert ready.json() == {"status": "ready"}
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'relay_idem_requests_total{outcome="executed"}' in metrics.text


async def test_readyz_is_503_when_the_store_is_down() -> None:
    async with proxy_client(FakeUpstream(ok()), store=DownStore()) as client:
        ready = await client.get("/_relay/readyz")
    assert ready.status_code == 503
    assert ready.headers["content-type"] == "application/problem+json"


async def test_relay_paths_never_reach_the_upstream_nor_count_as_bypass() -> None:
    upstream = FakeUpstream(ok())

    def bypass() -> float | None:
        return REGISTRY.get_sample_value("relay_idem_requests_total", {"outcome": "bypass"})

    bypass_before = bypass()
    async with proxy_client(upstream) as client:
        unknown = await client.post("/_relay/healthz", content=b"")
        missing = await client.get("/_relay/nothing")
        await client.get("/_relay/metrics")
    assert unknown.status_code == missing.status_code == 404
    assert unknown.json()["type"].endswith("/relay-endpoint-not-found")
    assert upstream.sent == []
    assert bypass() == bypass_before


async def test_lifespan_closes_the_upstream_and_the_store() -> None:
    class ClosingStore(MemoryStore):
        closed = False

        async def close(self) -> None:
            self.closed = True

    upstream, store = FakeUpstream(ok()), ClosingStore()
    app = build_proxy_app(Config(upstream="http://upstream.test"), store=store, upstream=upstream)
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert upstream.closed and store.closed


async def test_websockets_are_refused() -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    app = build_proxy_app(Config(upstream="http://upstream.test"), store=MemoryStore(), upstream=FakeUpstream(ok()))
    await app({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
    assert sent[0]["type"] == "websocket.close"
