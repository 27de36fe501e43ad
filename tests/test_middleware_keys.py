"""SPEC §3.1 through the middleware: which requests carry a key, which are rejected, which pass through."""

from __future__ import annotations

import json

import pytest

from relay_idem import IdempotencyMiddleware, MemoryStore, authorization_scope, header_scope
from tests.apps import Counter, Echo, call, client, idem

pytestmark = pytest.mark.anyio


def problem_type(body: bytes) -> str:
    document = json.loads(body)
    assert isinstance(document["type"], str)
    return document["type"]


async def test_raw_token_key_executes_once_and_replays() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app)
    async with client(middleware) as http:
        first = await http.post("/", headers={"Idempotency-Key": "order-1"})
        second = await http.post("/", headers={"Idempotency-Key": "order-1"})
    assert first.status_code == second.status_code == 200
    assert first.content == second.content == b"call 1"
    assert app.calls == 1


@pytest.mark.parametrize(("sent", "same_as"), [(b'"order-1"', b"order-1"), (b'"a\\"b\\\\c"', b'a"b\\c')])
async def test_sf_string_key_is_the_same_key_as_its_unquoted_token(sent: bytes, same_as: bytes) -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app)
    first = await call(middleware, headers=idem(same_as))
    second = await call(middleware, headers=idem(sent))
    assert second.header(b"idempotent-replayed") == b"true"
    assert second.body == first.body
    assert app.calls == 1
    assert app.claim["key"] == same_as.decode()


async def test_surrounding_whitespace_is_stripped_from_the_key() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app)
    await call(middleware, headers=idem(b"order-1"))
    replay = await call(middleware, headers=idem(b" \torder-1\t "))
    assert replay.header(b"idempotent-replayed") == b"true"
    assert app.calls == 1


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"  \t ", id="only-whitespace"),
        pytest.param(b'""', id="empty-sf-string"),
        pytest.param(b'"abc', id="unterminated-quote"),
        pytest.param(b'"a\\nb"', id="bad-escape"),
        pytest.param(b"a" * 256, id="256-characters"),
        pytest.param(b"a b", id="inner-space"),
        pytest.param(b"caf\xc3\xa9", id="non-ascii"),
        pytest.param(b"a\x00b", id="control-character"),
        pytest.param(b"a\x7f", id="del"),
    ],
)
async def test_malformed_key_is_400_problem_and_app_not_called(raw: bytes) -> None:
    app = Counter()
    result = await call(IdempotencyMiddleware(app), headers=idem(raw))
    assert result.status == 400
    assert result.header(b"content-type") == b"application/problem+json"
    assert problem_type(result.body).endswith("/invalid-key")
    assert app.calls == 0


async def test_key_of_255_characters_is_accepted() -> None:
    app = Counter()
    result = await call(IdempotencyMiddleware(app), headers=idem(b"k" * 255))
    assert result.status == 200
    assert app.claim["key"] == "k" * 255


async def test_duplicate_key_header_is_400_problem() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app)
    for values in ((b"a", b"b"), (b"a", b"a")):
        result = await call(middleware, headers=[(b"idempotency-key", value) for value in values])
        assert result.status == 400
        assert problem_type(result.body).endswith("/duplicate-key-header")
    async with client(middleware) as http:
        response = await http.post("/", headers=[("Idempotency-Key", "a"), ("idempotency-key", "b")])
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert app.calls == 0


async def test_header_name_is_matched_case_insensitively() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, header_name="X-Request-KEY")
    first = await call(middleware, headers=[(b"x-request-key", b"k")])
    second = await call(middleware, headers=[(b"x-request-key", b"k")])
    ignored = await call(middleware, headers=idem(b"k"))
    assert first.status == 200
    assert second.header(b"idempotent-replayed") == b"true"
    assert ignored.header(b"idempotent-replayed") is None
    assert app.calls == 2


async def test_covered_method_without_a_key_passes_through() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app)
    for _ in range(2):
        result = await call(middleware, body=[b"hel", b"lo"])
        assert result.status == 200
        assert result.body == b"hello"
        assert result.header(b"idempotent-replayed") is None
    assert app.calls == 2
    assert "idempotency" not in app.scopes[-1]["extensions"]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/42", "/v1/messages-batch"])
async def test_require_key_path_without_a_key_is_400(path: str) -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, require_key=("/v1/messages*", "/v2/*/send"))
    result = await call(middleware, path=path)
    assert result.status == 400
    assert result.header(b"content-type") == b"application/problem+json"
    assert problem_type(result.body).endswith("/key-required")
    assert app.calls == 0


async def test_require_key_uses_fnmatch_patterns_and_leaves_other_paths_alone() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, require_key=("/v1/messages*", "/v2/*/send"))
    assert (await call(middleware, path="/v2/abc/send")).status == 400
    assert (await call(middleware, path="/v1/orders")).status == 200
    assert (await call(middleware, path="/V1/messages")).status == 200  # fnmatch is case-sensitive on paths
    assert (await call(middleware, path="/v1/messages", headers=idem("k"))).status == 200
    assert (await call(middleware, method="GET", path="/v1/messages")).status == 200
    assert app.calls == 4


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
async def test_uncovered_method_passes_through_even_with_a_key(method: str) -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app)
    first = await call(middleware, method=method, headers=idem("k"))
    second = await call(middleware, method=method, headers=idem("k"))
    assert (first.body, second.body) == (b"call 1", b"call 2")
    assert "idempotency" not in app.scopes[-1]["extensions"]


async def test_methods_option_chooses_the_covered_methods() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, methods=("put", "POST"))
    await call(middleware, method="PUT", headers=idem("k"))
    replay = await call(middleware, method="PUT", headers=idem("k"))
    assert replay.header(b"idempotent-replayed") == b"true"
    patched = await call(middleware, method="PATCH", headers=idem("k"))
    assert patched.header(b"idempotent-replayed") is None
    assert app.calls == 2


async def test_non_http_scopes_pass_through() -> None:
    seen = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        seen.append(scope["type"])

    middleware = IdempotencyMiddleware(app)
    await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    await middleware({"type": "websocket", "headers": idem("k")}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan", "websocket"]


async def test_same_key_under_two_authorization_values_executes_twice_and_never_crosses() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app)
    alice = [(b"authorization", b"Bearer alice")]
    bob = [(b"authorization", b"Bearer bob")]
    first_alice = await call(middleware, headers=idem("k", *alice), body=b"alice's message")
    first_bob = await call(middleware, headers=idem("k", *bob), body=b"bob's message")
    assert app.calls == 2
    assert (first_alice.body, first_bob.body) == (b"alice's message", b"bob's message")
    again_alice = await call(middleware, headers=idem("k", *alice), body=b"alice's message")
    again_bob = await call(middleware, headers=idem("k", *bob), body=b"bob's message")
    assert app.calls == 2
    assert again_alice.body == b"alice's message"
    assert again_bob.body == b"bob's message"
    assert again_alice.header(b"idempotent-replayed") == again_bob.header(b"idempotent-replayed") == b"true"


async def test_tenant_scope_is_a_digest_of_the_credential_in_extensions() -> None:
    app = Counter()
    await call(IdempotencyMiddleware(app), headers=idem("k", (b"authorization", b"Bearer secret-token")))
    tenant = app.claim["scope"]
    assert tenant.startswith("authorization:")
    assert "secret-token" not in tenant
    assert tenant == authorization_scope({"headers": [(b"authorization", b"Bearer secret-token")]})


async def test_requests_without_credentials_share_the_anonymous_scope() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app)
    await call(middleware, headers=idem("k"))
    replay = await call(middleware, headers=idem("k", (b"x-api-key", b"whatever")))
    assert replay.header(b"idempotent-replayed") == b"true"
    assert app.claim["scope"] == "anonymous"


async def test_header_scope_namespaces_keys_by_another_header() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, scope=header_scope("X-Api-Key"))
    one = await call(middleware, headers=idem("k", (b"x-api-key", b"one")), body=b"one")
    two = await call(middleware, headers=idem("k", (b"x-api-key", b"two")), body=b"two")
    assert (one.body, two.body) == (b"one", b"two")
    assert app.calls == 2
    assert app.scopes[0]["extensions"]["idempotency"]["scope"].startswith("x-api-key:")
    # Authorization no longer separates tenants: the same X-Api-Key shares records.
    replay = await call(middleware, headers=idem("k", (b"x-api-key", b"one"), (b"authorization", b"x")), body=b"one")
    assert replay.header(b"idempotent-replayed") == b"true"
    assert replay.body == b"one"


async def test_custom_scope_function_gets_the_asgi_scope() -> None:
    app = Counter()
    store = MemoryStore()

    def by_path_prefix(scope: dict[str, object]) -> str:
        return str(scope["path"]).split("/")[1]

    middleware = IdempotencyMiddleware(app, store=store, scope=by_path_prefix)
    await call(middleware, path="/a/x", headers=idem("k"))
    assert app.claim["scope"] == "a"
