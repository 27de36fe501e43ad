"""SPEC §3.5: what makes two requests with the same key "the same request"."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from relay_idem.fingerprint import request_fingerprint
from relay_idem.options import FingerprintMode
from tests.apps import make_scope


def fingerprint(
    body: bytes = b"",
    *,
    method: str = "POST",
    path: str = "/v1/messages",
    query: bytes = b"",
    headers: Iterable[tuple[bytes, bytes]] = (),
    mode: FingerprintMode = "raw",
    names: Iterable[bytes] = (),
) -> bytes:
    scope = make_scope(method, path, headers, query)
    return request_fingerprint(scope, body, mode=mode, headers=tuple(names))


def test_fingerprint_is_a_128_bit_digest() -> None:
    assert len(fingerprint(b"x")) == 16


def test_same_request_has_the_same_fingerprint() -> None:
    assert fingerprint(b'{"a": 1}') == fingerprint(b'{"a": 1}')


@pytest.mark.parametrize(
    "other",
    [
        {"method": "PATCH"},
        {"path": "/v1/orders"},
        {"query": b"dry_run=1"},
        {"body": b'{"a": 2}'},
        {"body": b'{"a": 1} '},
    ],
)
def test_raw_fingerprint_covers_method_path_query_and_body_bytes(other: dict[str, object]) -> None:
    base: dict[str, object] = {"body": b'{"a": 1}'}
    assert fingerprint(**base) != fingerprint(**{**base, **other})  # type: ignore[arg-type]


def test_fingerprint_fields_are_separated() -> None:
    assert fingerprint(b"", path="/ab") != fingerprint(b"", path="/a", query=b"b")


def test_raw_fingerprint_sees_key_order_and_whitespace() -> None:
    assert fingerprint(b'{"a":1,"b":2}') != fingerprint(b'{"b": 2, "a": 1}')


def test_json_fingerprint_ignores_key_order_and_whitespace() -> None:
    first = fingerprint(b'{"a":1,"b":{"x":[1,2],"y":null}}', mode="json")
    second = fingerprint(b'{ "b" : { "y" : null , "x" : [ 1 , 2 ] } ,\n\t"a" : 1 }', mode="json")
    assert first == second


def test_json_fingerprint_still_sees_values_and_array_order() -> None:
    assert fingerprint(b'{"a":[1,2]}', mode="json") != fingerprint(b'{"a":[2,1]}', mode="json")
    assert fingerprint(b'{"a":"1"}', mode="json") != fingerprint(b'{"a":1}', mode="json")


def test_json_fingerprint_hashes_a_non_json_body_as_it_is() -> None:
    assert fingerprint(b"not json", mode="json") == fingerprint(b"not json", mode="raw")
    assert fingerprint(b"\xff\xfe", mode="json") == fingerprint(b"\xff\xfe", mode="raw")
    assert fingerprint(b"", mode="json") == fingerprint(b"", mode="raw")


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 50_000, b"[" * 5_000 + b"]" * 5_000])
def test_json_fingerprint_of_deeply_nested_body_does_not_raise(body: bytes) -> None:
    assert fingerprint(body, mode="json") == fingerprint(body, mode="raw")


def test_json_fingerprint_of_a_lone_surrogate_escape_does_not_raise() -> None:
    body = b'{"text": "\\ud800"}'
    assert fingerprint(body, mode="json") == fingerprint(body, mode="raw")


def test_fingerprint_headers_take_part_in_the_fingerprint() -> None:
    names = (b"x-account",)
    assert fingerprint(headers=[(b"x-account", b"a")], names=names) != fingerprint(
        headers=[(b"x-account", b"b")], names=names
    )
    assert fingerprint(headers=[(b"x-account", b"a")], names=names) == fingerprint(
        headers=[(b"x-account", b"a"), (b"x-other", b"z")], names=names
    )


def test_headers_outside_fingerprint_headers_are_ignored() -> None:
    assert fingerprint(headers=[(b"x-account", b"a")]) == fingerprint(headers=[(b"x-account", b"b")])


def test_repeated_fingerprint_header_values_count_in_order() -> None:
    names = (b"x-tag",)
    ab = fingerprint(headers=[(b"x-tag", b"a"), (b"x-tag", b"b")], names=names)
    ba = fingerprint(headers=[(b"x-tag", b"b"), (b"x-tag", b"a")], names=names)
    assert ab != ba
