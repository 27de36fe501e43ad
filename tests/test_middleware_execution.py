"""SPEC §3.2, §3.3 and §3.6 through the middleware: the first run, the replay, and what is stored."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from relay_idem import IdempotencyMiddleware, MemoryStore, Store
from relay_idem.keys import record_key
from relay_idem.scopes import ANONYMOUS_SCOPE
from tests.apps import (
    SET_COOKIE_HEADERS,
    AppFailed,
    Counter,
    Echo,
    Message,
    Raising,
    Receive,
    Result,
    Scope,
    Send,
    SetCookieTwice,
    Slow,
    Statuses,
    Streaming,
    call,
    client,
    idem,
    make_scope,
    respond,
)

pytestmark = pytest.mark.anyio


def store_key(store: Store, key: str, tenant: str = ANONYMOUS_SCOPE) -> str:
    return record_key(store.prefix, tenant, key)


async def call_raising(app: Any, **options: Any) -> tuple[Result, BaseException]:
    """Run a request whose app raises; returns what the client got and the exception."""
    got: list[Result] = []

    async def on_send(message: Message, result: Result) -> None:
        if not got:
            got.append(result)

    with pytest.raises(AppFailed) as raised:
        await call(app, on_send=on_send, **options)
    return (got[0] if got else Result()), raised.value


# --- §3.2 first request ---------------------------------------------------------------------------


async def test_app_sees_key_scope_and_owner_token_in_extensions_idempotency() -> None:
    store = MemoryStore()
    tokens_renewed = []

    class Outbox(Counter):
        async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
            claim = scope["extensions"]["idempotency"]
            key = record_key(store.prefix, claim["scope"], claim["key"])
            tokens_renewed.append(await store.renew(key, claim["token"], 10))  # usable as a fencing token
            tokens_renewed.append(await store.renew(key, claim["token"] + "x", 10))
            await super().handle(scope, body, send)

    app = Outbox()
    scope = make_scope(headers=idem('"order-7"', (b"authorization", b"Bearer t")))
    scope["extensions"] = {"http.response.trailers": {}, "http.response.pathsend": {}}
    await call(IdempotencyMiddleware(app, store=store), scope=scope)
    claim = app.claim
    assert {"key", "scope", "token"} <= set(claim)
    assert claim["key"] == "order-7"
    assert claim["scope"].startswith("authorization:")
    assert claim["token"]
    assert tokens_renewed == [True, False]
    extensions = app.scopes[0]["extensions"]
    assert "http.response.trailers" in extensions
    assert "http.response.pathsend" not in extensions  # a response we could not copy
    assert "idempotency" not in scope["extensions"]  # the server's scope is not modified


async def test_app_gets_the_buffered_request_body_whole() -> None:
    app = Echo()
    result = await call(IdempotencyMiddleware(app), headers=idem("k"), body=[b"he", b"", b"llo", b"!"])
    assert result.body == b"hello!"
    assert app.bodies == [b"hello!"]


async def test_record_is_completed_before_the_last_body_message_is_sent(store: Store) -> None:
    app = Streaming([b"one ", b"two ", b"three"])
    seen: list[tuple[bool, object]] = []

    async def inspect(message: Message, result: Result) -> None:
        if message["type"] == "http.response.body":
            info = await store.get(store_key(store, "k"))
            seen.append((message.get("more_body", False), info and info.record.response))

    result = await call(IdempotencyMiddleware(app, store=store), headers=idem("k"), on_send=inspect)
    assert result.body == b"one two three"
    assert [more for more, _ in seen] == [True, True, False]
    assert [response is None for _, response in seen] == [True, True, False]
    final = seen[-1][1]
    assert final is not None
    assert getattr(final, "body", None) == b"one two three"


async def test_released_key_is_free_before_the_last_body_message_is_sent(store: Store) -> None:
    app = Statuses(503)
    at_final: list[object] = []

    async def inspect(message: Message, result: Result) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            at_final.append(await store.get(store_key(store, "k")))

    result = await call(IdempotencyMiddleware(app, store=store), headers=idem("k"), on_send=inspect)
    assert result.status == 503
    assert at_final == [None]


async def test_lease_is_renewed_while_the_app_runs_past_lock_ttl(store: Store) -> None:
    app = Slow(delay=0.5)
    middleware = IdempotencyMiddleware(app, store=store, lock_ttl=0.15)
    first = asyncio.create_task(call(middleware, headers=idem("k")))
    await asyncio.sleep(0.35)  # more than twice lock_ttl: without renewal the claim would be gone
    info = await store.get(store_key(store, "k"))
    assert info is not None
    assert info.record.response is None
    repeat = await call(middleware, headers=idem("k"))
    assert repeat.status == 409
    assert (await first).body == b"call 1"
    replay = await call(middleware, headers=idem("k"))
    assert replay.body == b"call 1"
    assert replay.header(b"idempotent-replayed") == b"true"
    assert app.calls == 1


async def test_lease_renewal_stops_once_the_response_is_complete(caplog: pytest.LogCaptureFixture) -> None:
    class WorksAfterResponding(Counter):
        async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
            await super().handle(scope, body, send)
            await asyncio.sleep(0.3)  # background work after the response, past several renewal intervals

    middleware = IdempotencyMiddleware(WorksAfterResponding(), lock_ttl=0.06)
    with caplog.at_level(logging.WARNING, logger="relay_idem"):
        result = await call(middleware, headers=idem("k"))
    assert result.status == 200
    assert [record.getMessage() for record in caplog.records] == []


# --- §3.3 replay --------------------------------------------------------------------------------


async def test_replay_is_byte_exact_with_repeated_set_cookie_in_order() -> None:
    app = SetCookieTwice()
    middleware = IdempotencyMiddleware(app)
    first = await call(middleware, headers=idem("k"))
    replay = await call(middleware, headers=idem("k"))
    assert first.headers == [*SET_COOKIE_HEADERS, (b"content-length", b"11")]
    assert replay.status == first.status == 201
    assert replay.headers == [*first.headers, (b"idempotent-replayed", b"true")]
    assert replay.body == first.body == b'{"call": 1}'
    assert replay.header_list(b"set-cookie") == [b"session=abc; Path=/; HttpOnly", b"theme=dark; Path=/"]
    assert app.calls == 1


async def test_replay_over_http_keeps_both_set_cookie_headers() -> None:
    app = SetCookieTwice()
    async with client(IdempotencyMiddleware(app)) as http:
        first = await http.post("/", headers={"Idempotency-Key": "k"}, content=b"{}")
        replay = await http.post("/", headers={"Idempotency-Key": "k"}, content=b"{}")
    assert replay.headers.raw == [*first.headers.raw, (b"idempotent-replayed", b"true")]
    assert replay.headers.get_list("set-cookie") == ["session=abc; Path=/; HttpOnly", "theme=dark; Path=/"]
    assert "idempotent-replayed" not in first.headers
    assert replay.content == first.content
    assert app.calls == 1


async def test_replay_drops_hop_by_hop_headers() -> None:
    headers = [
        (b"content-type", b"text/plain"),
        (b"connection", b"keep-alive, x-per-hop"),
        (b"keep-alive", b"timeout=5"),
        (b"x-per-hop", b"1"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"x-end-to-end", b"2"),
    ]
    app = Echo(headers)
    middleware = IdempotencyMiddleware(app)
    first = await call(middleware, headers=idem("k"), body=b"hi")
    replay = await call(middleware, headers=idem("k"), body=b"hi")
    assert first.headers == [*headers, (b"content-length", b"2")]
    assert replay.headers == [
        (b"content-type", b"text/plain"),
        (b"x-end-to-end", b"2"),
        (b"content-length", b"2"),
        (b"idempotent-replayed", b"true"),
    ]


async def test_replay_does_not_call_the_app_and_does_not_read_past_the_body() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app)
    await call(middleware, headers=idem("k"))
    for _ in range(3):
        replay = await call(middleware, headers=idem("k"))
        assert replay.body == b"call 1"
    assert app.calls == 1


# --- §3.6 outcome policy ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 425, 429, 503])
async def test_not_processed_status_releases_the_key_and_a_retry_executes(status: int) -> None:
    app = Statuses(status, 200)
    middleware = IdempotencyMiddleware(app)
    first = await call(middleware, headers=idem("k"))
    retry = await call(middleware, headers=idem("k"))
    replay = await call(middleware, headers=idem("k"))
    assert (first.status, retry.status, replay.status) == (status, 200, 200)
    assert first.header(b"idempotent-replayed") is None
    assert retry.header(b"idempotent-replayed") is None
    assert replay.body == retry.body == b"call 2: 200"
    assert app.calls == 2


@pytest.mark.parametrize("status", [500, 502, 504, 400, 404, 409, 422, 201, 204])
async def test_every_other_status_is_final_and_replayed(status: int) -> None:
    app = Statuses(status, 200)
    middleware = IdempotencyMiddleware(app)
    first = await call(middleware, headers=idem("k"))
    replay = await call(middleware, headers=idem("k"))
    assert first.status == replay.status == status
    assert replay.body == first.body
    assert replay.header(b"idempotent-replayed") == b"true"
    assert app.calls == 1


async def test_final_status_option_decides_what_is_released() -> None:
    app = Statuses(500, 503, 200)
    middleware = IdempotencyMiddleware(app, final_status=lambda status: status < 500)
    statuses = [(await call(middleware, headers=idem("k"))).status for _ in range(4)]
    assert statuses == [500, 503, 200, 200]
    assert app.calls == 3


async def test_app_exception_is_stored_as_500_problem_json_and_reraised() -> None:
    app = Raising()
    middleware = IdempotencyMiddleware(app)
    first, error = await call_raising(middleware, headers=idem("k"))
    assert str(error) == "call 1 failed"
    assert first.status == 500
    assert first.header(b"content-type") == b"application/problem+json"
    document = json.loads(first.body)
    assert document["status"] == 500
    assert document["type"].endswith("/app-error")
    assert "call 1 failed" not in first.body.decode()  # never a traceback or the exception text
    replay = await call(middleware, headers=idem("k"))
    assert replay.status == 500
    assert replay.body == first.body
    assert replay.header(b"idempotent-replayed") == b"true"
    assert app.calls == 1


async def test_app_exception_after_the_response_started_is_stored_as_500_tombstone() -> None:
    app = Raising(after_start=True)
    middleware = IdempotencyMiddleware(app)
    first, _ = await call_raising(middleware, headers=idem("k"))
    assert first.status == 200  # the bytes already sent stay sent
    assert first.body == b"partial"
    assert first.messages[-1].get("more_body") is True  # and the response is never finished
    replay = await call(middleware, headers=idem("k"))
    assert replay.status == 500
    assert replay.body == b""
    assert replay.header(b"content-length") == b"0"
    assert replay.header(b"idempotent-replayed") == b"true"
    assert replay.header(b"idempotent-body-omitted") == b"true"
    assert app.calls == 1


async def test_app_returning_without_a_response_is_stored_as_500() -> None:
    class Silent(Counter):
        async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
            return None

    app = Silent()
    middleware = IdempotencyMiddleware(app)
    first = await call(middleware, headers=idem("k"))
    replay = await call(middleware, headers=idem("k"))
    assert first.status == replay.status == 500
    assert first.header(b"content-type") == b"application/problem+json"
    assert replay.body == first.body
    assert app.calls == 1


async def test_oversized_response_is_delivered_whole_then_replayed_as_tombstone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    headers = [(b"content-type", b"application/octet-stream"), (b"x-id", b"7")]
    app = Echo(headers, status=201)
    body = bytes(range(256)) * 4
    middleware = IdempotencyMiddleware(app, max_response_bytes=1000)
    with caplog.at_level(logging.WARNING, logger="relay_idem"):
        first = await call(middleware, headers=idem("secret-key-value"), body=body)
    assert first.status == 201
    assert first.body == body
    assert any("max_response_bytes" in record.getMessage() for record in caplog.records)
    assert not any("secret-key-value" in record.getMessage() for record in caplog.records)
    replay = await call(middleware, headers=idem("secret-key-value"), body=body)
    assert replay.status == 201
    assert replay.body == b""
    assert replay.headers == [
        *headers,
        (b"content-length", b"0"),
        (b"idempotent-replayed", b"true"),
        (b"idempotent-body-omitted", b"true"),
    ]
    assert app.calls == 1


async def test_streamed_oversized_response_reaches_the_client_whole() -> None:
    chunks = [bytes([n]) * 400 for n in range(5)]
    app = Streaming(chunks)
    middleware = IdempotencyMiddleware(app, max_response_bytes=1000)
    first = await call(middleware, headers=idem("k"))
    assert first.body == b"".join(chunks)
    assert [len(message.get("body", b"")) for message in first.messages[1:]] == [400] * 5
    replay = await call(middleware, headers=idem("k"))
    assert replay.header(b"idempotent-body-omitted") == b"true"
    assert app.calls == 1


async def test_response_of_exactly_max_response_bytes_is_stored_whole() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, max_response_bytes=1000)
    await call(middleware, headers=idem("k"), body=b"x" * 1000)
    replay = await call(middleware, headers=idem("k"), body=b"x" * 1000)
    assert replay.body == b"x" * 1000
    assert replay.header(b"idempotent-body-omitted") is None


async def test_client_disconnect_mid_response_still_completes_the_record(store: Store) -> None:
    app = Streaming([b"one ", b"two ", b"three"])
    middleware = IdempotencyMiddleware(app, store=store)

    async def gone_after_first_chunk(message: Message, result: Result) -> None:
        if message["type"] == "http.response.body" and result.body:
            raise OSError("client went away")

    first = await call(middleware, headers=idem("k"), on_send=gone_after_first_chunk)
    assert first.body == b"one "
    info = await store.get(store_key(store, "k"))
    assert info is not None
    assert info.record.response is not None
    retry = await call(middleware, headers=idem("k"))
    assert retry.body == b"one two three"
    assert retry.header(b"idempotent-replayed") == b"true"
    assert app.calls == 1


async def test_client_disconnect_before_the_response_still_completes_the_record() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app)

    async def gone(message: Message, result: Result) -> None:
        raise OSError("client went away")

    first = await call(middleware, headers=idem("k"), on_send=gone)
    assert first.status is None
    retry = await call(middleware, headers=idem("k"))
    assert retry.body == b"call 1"
    assert app.calls == 1


async def test_disconnect_while_the_request_body_arrives_runs_nothing() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app)
    messages = [{"type": "http.request", "body": b"part", "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> Message:
        return messages.pop(0)

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(make_scope(headers=idem("k")), receive, send)
    assert sent == []
    assert app.calls == 0
    assert (await call(middleware, headers=idem("k"))).body == b"call 1"


async def test_streaming_chunks_reach_the_client_before_the_app_finishes() -> None:
    gate = asyncio.Event()
    app = Streaming([b"first ", b"second ", b"last"], gate=gate)
    middleware = IdempotencyMiddleware(app)

    async def release_when_streamed(message: Message, result: Result) -> None:
        if message.get("body") == b"second ":
            gate.set()  # the app only finishes once the client has seen its chunks

    result = await asyncio.wait_for(call(middleware, headers=idem("k"), on_send=release_when_streamed), 2.0)
    assert result.body == b"first second last"
    assert (await call(middleware, headers=idem("k"))).body == b"first second last"


async def test_request_without_key_is_not_stored() -> None:
    store = MemoryStore()
    app = Counter()
    middleware = IdempotencyMiddleware(app, store=store)
    await call(middleware)
    assert store._entries == {}


async def test_store_none_means_a_fresh_memory_store_per_middleware() -> None:
    app = Counter()
    one, two = IdempotencyMiddleware(app), IdempotencyMiddleware(app)
    assert isinstance(one.store, MemoryStore)
    assert one.store is not two.store
    await call(one, headers=idem("k"))
    assert (await call(two, headers=idem("k"))).body == b"call 2"


async def test_app_can_be_any_asgi_callable() -> None:
    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, b"bare")

    middleware = IdempotencyMiddleware(bare)
    await call(middleware, headers=idem("k"))
    assert (await call(middleware, headers=idem("k"))).header(b"idempotent-replayed") == b"true"
