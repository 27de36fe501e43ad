"""Tenant scopes: which credential a key belongs to.

A scope is a short string derived from the request. Keys are namespaced by it, so the same
``Idempotency-Key`` sent with two API keys names two unrelated records. Credentials are hashed,
never stored or logged as they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from starlette.types import Scope

ANONYMOUS_SCOPE = "anonymous"

ScopeFunction = Callable[[Scope], str]


def credential_scope(label: str, credential: bytes) -> str:
    """The scope string for one credential value, as ``label:<128-bit digest>``."""
    return f"{label}:{hashlib.blake2b(credential, digest_size=16).hexdigest()}"


def _header_value(scope: Scope, name: bytes) -> bytes | None:
    for header_name, value in scope["headers"]:
        if header_name == name:
            return bytes(value)
    return None


def authorization_scope(scope: Scope) -> str:
    """Default scope: a digest of the ``Authorization`` header, or ``anonymous`` without one."""
    credential = _header_value(scope, b"authorization")
    if credential is None:
        return ANONYMOUS_SCOPE
    return credential_scope("authorization", credential)


def header_scope(header_name: str) -> ScopeFunction:
    """Build a scope function from another credential header, e.g. ``header_scope("X-Api-Key")``."""
    name = header_name.lower().encode("latin-1")
    label = header_name.lower()

    def scope_from_header(scope: Scope) -> str:
        credential = _header_value(scope, name)
        if credential is None:
            return ANONYMOUS_SCOPE
        return credential_scope(label, credential)

    scope_from_header.__name__ = f"header_scope_{label.replace('-', '_')}"
    return scope_from_header
