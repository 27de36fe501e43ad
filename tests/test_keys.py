"""SPEC §3.1: what an ``Idempotency-Key`` value may be, and the store key its record lives under."""

from __future__ import annotations

import pytest

from relay_idem.keys import MAX_KEY_LENGTH, InvalidKey, parse_key, record_key


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b"abc", "abc"),
        (b"order-42_x.y~z", "order-42_x.y~z"),
        (b"8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        (b"!#$%&'*+-.^_`|~:/@", "!#$%&'*+-.^_`|~:/@"),
        (b"a" * MAX_KEY_LENGTH, "a" * MAX_KEY_LENGTH),
    ],
)
def test_raw_token_is_the_key(raw: bytes, key: str) -> None:
    assert parse_key(raw) == key


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b'"abc"', "abc"),
        (b'"8e03978e-40d5"', "8e03978e-40d5"),
        (b'"a\\"b"', 'a"b'),
        (b'"a\\\\b"', "a\\b"),
        (b'"\\\\\\""', '\\"'),
        (b'"' + b"k" * MAX_KEY_LENGTH + b'"', "k" * MAX_KEY_LENGTH),
    ],
)
def test_sf_string_is_unquoted_with_its_escapes(raw: bytes, key: str) -> None:
    assert parse_key(raw) == key


@pytest.mark.parametrize("raw", [b"  abc", b"abc  ", b"\tabc\t", b" \t abc \t ", b' "abc" '])
def test_surrounding_spaces_and_tabs_are_not_part_of_the_key(raw: bytes) -> None:
    assert parse_key(raw) == "abc"


@pytest.mark.parametrize("raw", [b"", b"   ", b"\t", b'""', b' "" '])
def test_empty_key_is_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidKey, match="empty"):
        parse_key(raw)


@pytest.mark.parametrize("raw", [b'"abc', b'"', b'"abc\\"', b'  "abc  '])
def test_unterminated_quoted_string_is_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidKey, match="unterminated"):
        parse_key(raw)


@pytest.mark.parametrize("raw", [b'"a\\nb"', b'"a\\x"', b'"a\\'])
def test_sf_string_escapes_only_quote_and_backslash(raw: bytes) -> None:
    with pytest.raises(InvalidKey):
        parse_key(raw)


@pytest.mark.parametrize("raw", [b'"abc"def', b'"abc" "def"', b'"a""'])
def test_characters_after_the_closing_quote_are_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidKey, match="after the closing quote"):
        parse_key(raw)


@pytest.mark.parametrize("raw", [b"a" * (MAX_KEY_LENGTH + 1), b'"' + b"a" * (MAX_KEY_LENGTH + 1) + b'"'])
def test_key_longer_than_255_characters_is_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidKey, match="longer than 255"):
        parse_key(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"a b",
        b"a\tb",
        b'"a b"',
        b"caf\xc3\xa9",
        b"\xff",
        b"a\x00b",
        b"a\x7fb",
        b"a\x1fb",
        b"\x80",
        b"abc\r\n",
    ],
)
def test_key_outside_visible_ascii_is_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidKey):
        parse_key(raw)


def test_invalid_key_is_a_value_error() -> None:
    assert issubclass(InvalidKey, ValueError)


def test_record_key_separates_tenants() -> None:
    assert record_key("p", "authorization:a", "k") != record_key("p", "authorization:b", "k")
    assert record_key("p", "anonymous", "k") == record_key("p", "anonymous", "k")


def test_record_key_is_unambiguous_across_scope_and_key_boundaries() -> None:
    assert record_key("p", "ab", "c") != record_key("p", "a", "bc")


def test_record_key_starts_with_the_prefix_has_fixed_size_and_no_hash_tag() -> None:
    short = record_key("relay-idem", "anonymous", "k")
    long = record_key("relay-idem", "authorization:" + "x" * 40, "{tag}" * 50)
    assert short.startswith("relay-idem:")
    assert len(short) == len(long)
    assert "{" not in long
    assert "}" not in long


def test_record_key_does_not_contain_the_tenant_key() -> None:
    assert "secret-order-key" not in record_key("p", "anonymous", "secret-order-key")
