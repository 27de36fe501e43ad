"""The ``Idempotency-Key`` value (SPEC §3.1) and the store key a record lives under."""

from __future__ import annotations

import hashlib

MAX_KEY_LENGTH = 255


class InvalidKey(ValueError):
    """The header value is not a key: empty, too long, not visible ASCII, or a broken sf-string."""


def _unquote_sf_string(value: str) -> str:
    """Unquote an RFC 8941 sf-string (``"abc"``), whose only escapes are ``\\"`` and ``\\\\``."""
    chars: list[str] = []
    position = 1
    while position < len(value):
        char = value[position]
        if char == "\\":
            position += 1
            if position == len(value) or value[position] not in '"\\':
                raise InvalidKey("an sf-string may only escape '\"' and '\\'")
            chars.append(value[position])
        elif char == '"':
            if position != len(value) - 1:
                raise InvalidKey("characters after the closing quote")
            return "".join(chars)
        else:
            chars.append(char)
        position += 1
    raise InvalidKey("unterminated quoted string")


def parse_key(raw: bytes) -> str:
    """The key carried by one header value, or :class:`InvalidKey`.

    Surrounding spaces and tabs are not part of a field value. What remains is a raw token
    or an sf-string; unquoted, it must be 1-255 visible ASCII characters (0x21-0x7E).
    """
    value = raw.strip(b" \t").decode("latin-1")
    if value.startswith('"'):
        value = _unquote_sf_string(value)
    if not value:
        raise InvalidKey("the key is empty")
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidKey(f"the key is longer than {MAX_KEY_LENGTH} characters")
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise InvalidKey("the key may only contain visible ASCII characters")
    return value


def record_key(prefix: str, scope: str, key: str) -> str:
    """The store key of ``key`` under tenant ``scope``.

    A digest keeps names fixed-size and unambiguous whatever the scope function returns, keeps
    tenants' keys out of the keyspace, and carries no ``{hash tag}`` that would pin records to one
    Cluster slot.
    """
    digest = hashlib.blake2b(f"{scope}\x00{key}".encode(), digest_size=20).hexdigest()
    return f"{prefix}:{digest}"
