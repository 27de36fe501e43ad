"""Properties (hypothesis): no key value breaks the middleware, and any response replays byte for byte."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_idem import IdempotencyMiddleware, MemoryStore
from relay_idem.headers import HOP_BY_HOP
from relay_idem.keys import InvalidKey, parse_key
from tests.apps import App, Counter, Echo, RawHeaders, Result, Scope, Send, call, idem

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

visible = st.binary(min_size=1, max_size=40).filter(lambda value: all(0x21 <= byte <= 0x7E for byte in value))
key_values = st.one_of(
    st.binary(max_size=300),
    visible,
    st.builds(lambda inner: b'"' + inner + b'"', st.binary(max_size=40)),
    st.builds(lambda inner, pad: pad + inner + pad, visible, st.sampled_from([b" ", b"\t", b" \t"])),
    st.just(b"k" * 255),
    st.just(b"k" * 256),
)
header_names = st.from_regex(rb"\A[a-z][a-z0-9-]{0,15}\Z").filter(
    lambda name: name not in HOP_BY_HOP and name != b"connection"
)
response_headers = st.lists(st.tuples(header_names, st.binary(max_size=40)), max_size=8)
chunks = st.lists(st.binary(max_size=300), max_size=6)


def valid(values: list[bytes]) -> bool:
    if len(values) != 1:
        return False
    try:
        parse_key(values[0])
    except InvalidKey:
        return False
    return True


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


@SETTINGS
@given(values=st.lists(key_values, max_size=3))
def test_arbitrary_key_header_values_never_give_a_5xx_or_an_exception(values: list[bytes]) -> None:
    app = Counter()
    middleware = IdempotencyMiddleware(app, store=MemoryStore())
    headers = [(b"idempotency-key", value) for value in values]

    async def twice() -> tuple[Result, Result]:
        return await call(middleware, headers=headers), await call(middleware, headers=headers)

    first, second = run(twice())
    assert first.status is not None
    assert first.status < 500
    assert second.status is not None
    assert second.status < 500
    if not values:
        assert (first.status, second.status, app.calls) == (200, 200, 2)
    elif valid(values):
        assert (first.status, second.status, app.calls) == (200, 200, 1)
        assert second.header(b"idempotent-replayed") == b"true"
    else:
        assert (first.status, second.status, app.calls) == (400, 400, 0)
        assert first.header(b"content-type") == b"application/problem+json"


class Scripted(App):
    """Answers with exactly the status, headers and body chunks it was given."""

    def __init__(self, status: int, headers: RawHeaders, body: list[bytes]) -> None:
        super().__init__()
        self.status = status
        self.headers = headers
        self.body = body

    async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        for chunk in self.body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@SETTINGS
@given(
    status=st.integers(200, 599).filter(lambda status: status not in (408, 425, 429, 503)),
    headers=response_headers,
    body=chunks,
)
def test_arbitrary_bodies_and_headers_replay_byte_for_byte(status: int, headers: RawHeaders, body: list[bytes]) -> None:
    app = Scripted(status, headers, body)
    middleware = IdempotencyMiddleware(app, store=MemoryStore())

    async def twice() -> tuple[Result, Result]:
        return await call(middleware, headers=idem("k")), await call(middleware, headers=idem("k"))

    first, replay = run(twice())
    assert first.status == replay.status == status
    assert first.headers == headers
    assert first.body == b"".join(body)
    assert replay.headers == [*headers, (b"idempotent-replayed", b"true")]
    assert replay.body == first.body
    assert app.calls == 1


@SETTINGS
@given(body=st.binary(max_size=2000), splits=st.lists(st.integers(0, 2000), max_size=5))
def test_request_body_arrives_whole_however_it_is_chunked(body: bytes, splits: list[int]) -> None:
    cuts = sorted({0, len(body), *(min(cut, len(body)) for cut in splits)})
    pieces = [body[start:end] for start, end in itertools.pairwise(cuts)] or [b""]
    app = Echo()
    middleware = IdempotencyMiddleware(app, store=MemoryStore())

    async def chunked_then_whole() -> tuple[Result, Result]:
        return await call(middleware, headers=idem("k"), body=pieces), await call(
            middleware, headers=idem("k"), body=body
        )

    first, replay = run(chunked_then_whole())
    assert app.bodies == [body]
    assert first.body == body
    assert replay.header(b"idempotent-replayed") == b"true"  # same request: the chunking is not fingerprinted


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@SETTINGS
@given(document=json_values, data=st.data())
def test_json_fingerprint_replays_any_reordering_and_reformatting(document: Any, data: st.DataObject) -> None:
    def reorder(value: Any) -> Any:
        if isinstance(value, dict):
            items = data.draw(st.permutations(list(value.items())))
            return {key: reorder(item) for key, item in items}
        if isinstance(value, list):
            return [reorder(item) for item in value]
        return value

    first_body = json.dumps(document).encode()
    second_body = json.dumps(reorder(document), indent=data.draw(st.sampled_from([None, 0, 2]))).encode()
    app = Counter()
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), fingerprint="json")

    async def twice() -> tuple[Result, Result]:
        return await call(middleware, headers=idem("k"), body=first_body), await call(
            middleware, headers=idem("k"), body=second_body
        )

    first, second = run(twice())
    assert first.status == second.status == 200
    assert second.header(b"idempotent-replayed") == b"true"
    assert app.calls == 1


@SETTINGS
@given(body=st.binary(max_size=500), mode=st.sampled_from(["raw", "json"]))
def test_arbitrary_request_bodies_never_give_a_5xx(body: bytes, mode: str) -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), fingerprint=mode)
    result = run(call(middleware, headers=idem("k"), body=body))
    assert result.status == 200
    assert result.body == body


@SETTINGS
@given(
    value=st.one_of(
        st.binary(max_size=30),
        st.text(alphabet="0123456789", min_size=1, max_size=6000).map(str.encode),
    )
)
def test_arbitrary_content_length_values_never_give_a_5xx(value: bytes) -> None:
    app = Echo()
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), max_request_bytes=100)
    result = run(call(middleware, headers=[*idem("k"), (b"content-length", value)], body=b"body"))
    assert result.status in (200, 413)
    assert (result.status == 200) == (app.calls == 1)
