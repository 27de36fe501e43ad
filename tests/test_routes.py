"""SPEC §8.1-8.3 in process: routes, key sources and replayed headers."""

from __future__ import annotations

import fnmatch
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_idem import IdempotencyMiddleware, MemoryStore, RedisStore, RoutePolicy
from relay_idem.keys import record_key
from relay_idem.routes import path_matcher
from relay_idem.scopes import ANONYMOUS_SCOPE
from tests.apps import Counter, Echo, SetCookieTwice, call, idem
from tests.store.test_redis_scripts import Monitor

pytestmark = pytest.mark.anyio
JSON = (b"content-type", b"application/json")


def problem_type(result: object) -> str:
    document = json.loads(result.body)  # type: ignore[attr-defined]
    return str(document["type"]).rsplit("/", 1)[-1]


# --- routes -----------------------------------------------------------------------------------


async def test_the_first_matching_route_decides() -> None:
    app = Counter()
    strict_first = IdempotencyMiddleware(
        app, routes=[RoutePolicy("/v1/a*", require_key=True), RoutePolicy("/v1/*", enabled=False)]
    )
    loose_first = IdempotencyMiddleware(
        app, routes=[RoutePolicy("/v1/*", enabled=False), RoutePolicy("/v1/a*", require_key=True)]
    )
    refused = await call(strict_first, path="/v1/abc")
    assert (refused.status, problem_type(refused)) == (400, "key-required")
    assert (await call(strict_first, path="/v1/xyz")).status == 200
    assert (await call(loose_first, path="/v1/abc")).status == 200
    assert app.calls == 2


async def test_a_request_no_route_matches_follows_the_global_options() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(
        app, require_key=["/v1/*"], ttl=50, routes=[RoutePolicy("/webhooks/*", require_key=False, ttl=5)]
    )
    refused = await call(middleware, path="/v1/messages")
    assert (refused.status, problem_type(refused)) == (400, "key-required")
    assert (await call(middleware, path="/webhooks/x")).status == 200
    # The route's own options apply on its paths, the global ones elsewhere.
    store = middleware.store
    await call(middleware, path="/webhooks/x", headers=idem("w"))
    await call(middleware, path="/v1/messages", headers=idem("v"))
    routed = await store.get(record_key(store.prefix, ANONYMOUS_SCOPE, "w"))
    unrouted = await store.get(record_key(store.prefix, ANONYMOUS_SCOPE, "v"))
    assert routed is not None and routed.ttl is not None and routed.ttl <= 5
    assert unrouted is not None and unrouted.ttl is not None and 5 < unrouted.ttl <= 50


async def test_a_route_require_key_false_beats_a_global_pattern() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, require_key=["/v1/*"], routes=[RoutePolicy("/v1/open", require_key=False)])
    assert (await call(middleware, path="/v1/open")).status == 200
    assert (await call(middleware, path="/v1/closed")).status == 400


async def test_a_route_covers_its_own_methods_only() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, routes=[RoutePolicy("/v1/items*", methods=["put"], require_key=True)])
    # PUT is covered on the route although the middleware's methods are POST and PATCH.
    assert (await call(middleware, method="PUT", path="/v1/items/1")).status == 400
    first = await call(middleware, method="PUT", path="/v1/items/1", headers=idem("p"))
    again = await call(middleware, method="PUT", path="/v1/items/1", headers=idem("p"))
    assert again.body == first.body and again.header(b"idempotent-replayed") == b"true"
    # POST does not match the route: the global options (no key required) decide.
    assert (await call(middleware, method="POST", path="/v1/items/1")).status == 200
    assert app.calls == 2


async def test_a_disabled_route_sends_no_store_command(redis_url: str, prefix: str) -> None:
    store = RedisStore.from_url(redis_url, prefix=prefix)
    app = Counter()
    middleware = IdempotencyMiddleware(app, store, routes=[RoutePolicy("/v1/exports*", enabled=False)])
    try:
        await call(middleware, path="/v1/warm-up", headers=idem("warm"))  # connections are open

        async def keyed_requests() -> None:
            for _ in range(3):
                assert (await call(middleware, path="/v1/exports/9", headers=idem("same"))).status == 200

        with Monitor(redis_url) as monitor:
            sent = await monitor.sent(store.redis, store.prefix, keyed_requests)
        with Monitor(redis_url) as monitor:
            counted = await monitor.sent(store.redis, store.prefix, lambda: call(middleware, headers=idem("new")))
    finally:
        await store.close()
    assert sent == []
    assert app.calls == 5  # every repeat on the disabled route ran the app
    assert [command.name for command in counted] == ["EVALSHA", "EVALSHA"]  # the Monitor does see the store


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (lambda: RoutePolicy("v1/*"), "start with '/'"),
        (lambda: RoutePolicy("/v1/*", scope=lambda scope: "x"), "unknown option scope"),
        (lambda: RoutePolicy("/v1/*", header_name="X-Key"), "unknown option header_name"),
        (lambda: RoutePolicy("/v1/*", tll=5), "unknown option tll"),
        (lambda: RoutePolicy("/v1/*", on_conflict="queue"), "on_conflict"),
        (lambda: RoutePolicy("/v1/*", ttl=0), "ttl"),
        (lambda: RoutePolicy("/v1/*", key="cookie:id"), "header:NAME"),
        (lambda: RoutePolicy("/v1/*", key="json:a..b"), "json:PATH"),
        (lambda: RoutePolicy("/v1/*", methods="POST"), "methods"),
        (lambda: RoutePolicy("/v1/*", require_key="yes"), "require_key"),
        (lambda: RoutePolicy("/v1/*", enabled=0), "enabled"),
        (lambda: RoutePolicy("/v1/*", replay_exclude_headers="set-cookie"), "replay_exclude_headers"),
        (lambda: IdempotencyMiddleware(Counter(), routes=["/v1/*"]), "RoutePolicy"),
    ],
)
def test_a_bad_route_is_a_value_error_at_construction(route: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        route()  # type: ignore[operator]


def test_routes_compare_and_print_by_value() -> None:
    route = RoutePolicy("/v1/*", require_key=True, ttl=60)
    assert route == RoutePolicy("/v1/*", require_key=True, ttl=60)
    assert route != RoutePolicy("/v1/*", ttl=60)
    assert repr(route) == "RoutePolicy('/v1/*', require_key=True, ttl=60)"


async def test_routes_change_policy_not_identity() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, routes=[RoutePolicy("/a", on_conflict="wait")])
    await call(middleware, path="/a", headers=idem("k"))
    other_path = await call(middleware, path="/b", headers=idem("k"))
    assert (other_path.status, problem_type(other_path)) == (422, "key-reused")


# --- key sources ------------------------------------------------------------------------------


async def test_a_header_key_source_on_a_route() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(
        app, routes=[RoutePolicy("/webhooks/github", key="header:X-GitHub-Delivery", require_key=True)]
    )
    delivery = [(b"x-github-delivery", b"72d3162e-cc78-11e3-81ab-4c9367dc0958")]
    first = await call(middleware, path="/webhooks/github", headers=delivery, body=b"{}")
    again = await call(middleware, path="/webhooks/github", headers=delivery, body=b"{}")
    assert again.body == first.body and again.header(b"idempotent-replayed") == b"true"
    missing = await call(middleware, path="/webhooks/github", headers=idem("not-the-source"), body=b"{}")
    assert (missing.status, problem_type(missing)) == (400, "key-required")
    twice = await call(middleware, path="/webhooks/github", headers=delivery * 2)
    assert (twice.status, problem_type(twice)) == (400, "duplicate-key-header")
    assert app.calls == 1


async def test_header_name_keeps_meaning_its_header_and_a_global_key_replaces_it() -> None:
    app = Counter()
    by_name = IdempotencyMiddleware(app, header_name="X-Request-Id")
    by_key = IdempotencyMiddleware(app, header_name="X-Request-Id", key="header:X-Delivery")
    for middleware, header in ((by_name, b"x-request-id"), (by_key, b"x-delivery")):
        await call(middleware, headers=[(header, b"k1")])
        assert (await call(middleware, headers=[(header, b"k1")])).header(b"idempotent-replayed") == b"true"
    assert app.calls == 2


async def test_a_json_key_replays_the_same_event() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, routes=[RoutePolicy("/webhooks/shop", key="json:event.id")])
    event = b'{"event": {"id": "evt_1", "type": "order.paid"}}'
    first = await call(middleware, path="/webhooks/shop", headers=[JSON], body=event)
    again = await call(middleware, path="/webhooks/shop", headers=[JSON], body=[event[:10], event[10:]])
    assert first.body == event
    assert again.body == event and again.header(b"idempotent-replayed") == b"true"
    assert app.calls == 1
    claims = [scope["extensions"]["idempotency"]["key"] for scope in app.scopes]
    assert claims == ["evt_1"]


async def test_an_integer_json_key_is_its_decimal_text() -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, key="json:id")
    await call(middleware, body=b'{"id": 12345}')
    assert (await call(middleware, body=b'{"id": 12345}')).header(b"idempotent-replayed") == b"true"
    assert app.scopes[0]["extensions"]["idempotency"]["key"] == "12345"


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1, 2]", b'"id"', b'{"event": {}}', b'{"event": "evt_1"}', b'{"other": 1}', b"\xff"],
)
async def test_a_missing_json_key_is_no_key(body: bytes) -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, key="json:event.id")
    passed = await call(middleware, body=body)
    assert (passed.status, passed.body) == (200, body)  # the app got the body it was sent
    required = IdempotencyMiddleware(app, key="json:event.id", require_key=["/*"])
    refused = await call(required, body=body)
    assert (refused.status, problem_type(refused)) == (400, "key-required")


async def test_a_json_body_over_max_request_bytes_is_no_key_and_reaches_the_app_whole() -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, key="json:id", max_request_bytes=16)
    body = b'{"id": "evt_1", "padding": "' + b"x" * 40 + b'"}'
    streamed = await call(middleware, body=[body[:10], body[10:20], body[20:]])
    declared = await call(middleware, headers=[(b"content-length", str(len(body)).encode())], body=body)
    assert (streamed.status, streamed.body) == (200, body)
    assert (declared.status, declared.body) == (200, body)
    assert streamed.header(b"idempotent-replayed") is None and app.calls == 2


@pytest.mark.parametrize(
    "value",
    [{"a": 1}, [1], 1.5, True, False, None, "x" * 256, "", "a b", "tab\there", "new\nline", "é"],
)
async def test_an_invalid_json_key_is_400_invalid_key(value: object) -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, key="json:data.object.id")
    body = json.dumps({"data": {"object": {"id": value}}}).encode()
    refused = await call(middleware, body=body)
    assert refused.status == 400
    assert refused.header(b"content-type") == b"application/problem+json"
    assert json.loads(refused.body)["type"].endswith("/invalid-key")
    assert app.calls == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["id", "x"]), children),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=json_values | st.dictionaries(st.sampled_from(["id", "event"]), json_values), raw=st.binary())
async def test_no_json_body_gets_a_5xx(document: object, raw: bytes) -> None:
    middleware = IdempotencyMiddleware(Counter(), MemoryStore(), key="json:event.id", max_request_bytes=512)
    for body in (json.dumps(document).encode(), raw):
        result = await call(middleware, body=body)
        assert result.status is not None and result.status < 500, (body, result.body)
        if result.status == 400:
            assert problem_type(result) == "invalid-key"


# --- replayed headers -------------------------------------------------------------------------


async def test_excluded_headers_are_neither_stored_nor_replayed() -> None:
    app = SetCookieTwice()
    store = MemoryStore()
    middleware = IdempotencyMiddleware(app, store, replay_exclude_headers=["Set-Cookie"])
    first = await call(middleware, headers=idem("k"))
    again = await call(middleware, headers=idem("k"))
    assert len(first.header_list(b"set-cookie")) == 2  # the first response is the app's own
    assert again.header_list(b"set-cookie") == []
    kept = [(name, value) for name, value in first.headers if name != b"set-cookie"]
    assert again.headers == [*kept, (b"idempotent-replayed", b"true")]
    info = await store.get(record_key(store.prefix, ANONYMOUS_SCOPE, "k"))
    assert info is not None and info.record.response is not None
    assert all(name != b"set-cookie" for name, _ in info.record.response.headers)


async def test_a_route_excludes_its_own_headers() -> None:
    app = SetCookieTwice()
    middleware = IdempotencyMiddleware(app, routes=[RoutePolicy("/login", replay_exclude_headers=["set-cookie"])])
    for path in ("/login", "/other"):
        await call(middleware, path=path, headers=idem(path))
    assert (await call(middleware, path="/login", headers=idem("/login"))).header_list(b"set-cookie") == []
    assert len((await call(middleware, path="/other", headers=idem("/other"))).header_list(b"set-cookie")) == 2


@settings(max_examples=500, deadline=None)
@given(
    pattern=st.text(alphabet="/ab*?[]!", min_size=1, max_size=8).map(lambda text: "/" + text),
    path=st.text(alphabet="/ab*?[]!c", max_size=10),
)
def test_prepared_patterns_match_as_fnmatch_does(pattern: str, path: str) -> None:
    matcher = path_matcher([pattern])
    assert matcher is not None
    assert matcher(path) == fnmatch.fnmatchcase(path, pattern)
