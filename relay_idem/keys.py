"""The ``Idempotency-Key`` value (SPEC §3.1) and the store key a record lives under."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

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
    return check_key(value)


def check_key(value: str) -> str:
    """``value`` if it is a key (1-255 visible ASCII characters), else :class:`InvalidKey`."""
    if not value:
        raise InvalidKey("the key is empty")
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidKey(f"the key is longer than {MAX_KEY_LENGTH} characters")
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise InvalidKey("the key may only contain visible ASCII characters")
    return value


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where a request's key comes from (SPEC §8.2): a header, or a field of a JSON object body."""

    header: bytes | None = None  # the header's name, lowercase latin-1
    json_path: tuple[str, ...] = ()
    label: str = "Idempotency-Key"  # how error details name the source

    @classmethod
    def parse(cls, text: str) -> KeySource:
        """``"header:NAME"`` or ``"json:PATH"`` (a dotted path), else ``ValueError``."""
        kind, _, name = text.partition(":") if isinstance(text, str) else ("", "", "")
        if kind == "header" and name and name.isascii() and name.strip() == name and " " not in name:
            return cls(header=name.lower().encode("latin-1"), label=name)
        path = tuple(name.split("."))
        if kind == "json" and all(path):
            return cls(json_path=path, label=f"JSON field {name}")
        raise ValueError(f'key must be "header:NAME" or "json:PATH" (e.g. "json:event.id"), not {text!r}')


JSON_TYPE_NAMES: dict[type, str] = {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}


def json_key(body: bytes, path: tuple[str, ...]) -> str | None:
    """The key at ``path`` in a JSON object body: None if there is none, :class:`InvalidKey` if it is no key.

    A body that is not a JSON object, or lacks the field, has no key. A string is the key; an integer
    is its decimal text; any other value (object, array, float, boolean, null) is an invalid key.
    """
    try:
        value: Any = json.loads(body)
    except (ValueError, RecursionError):
        return None
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return None
        value = value[name]
    if isinstance(value, str):
        return check_key(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return check_key(str(value))
    raise InvalidKey(f"the key must be a string or an integer, not {JSON_TYPE_NAMES.get(type(value), 'a number')}")


def key_hint(key: str) -> str:
    """Enough of a key to find it in logs and traces, never the whole key of a tenant."""
    return key[:4]


def record_key(prefix: str, scope: str, key: str) -> str:
    """The store key of ``key`` under tenant ``scope``.

    A digest keeps names fixed-size and unambiguous whatever the scope function returns, keeps
    tenants' keys out of the keyspace, and carries no ``{hash tag}`` that would pin records to one
    Cluster slot.
    """
    digest = hashlib.blake2b(f"{scope}\x00{key}".encode(), digest_size=20).hexdigest()
    return f"{prefix}:{digest}"
