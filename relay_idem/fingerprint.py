"""What makes two requests with the same key "the same request" (SPEC §3.5)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection

from starlette.types import Scope

from relay_idem.options import FingerprintMode


def _canonical_json(body: bytes) -> bytes:
    """Key order and whitespace ignored; a body that is not JSON, or nested too deep to parse, is hashed as it is."""
    try:
        document = json.loads(body)
        return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except (ValueError, RecursionError):
        return body


def request_fingerprint(
    scope: Scope,
    body: bytes,
    *,
    mode: FingerprintMode = "raw",
    headers: Collection[bytes] = (),
) -> bytes:
    """A 128-bit digest of method, path, query, the chosen headers and the body."""
    digest = hashlib.blake2b(digest_size=16)
    path = scope.get("raw_path") or scope["path"].encode()
    digest.update(scope["method"].encode() + b"\x00" + path + b"\x00" + scope["query_string"] + b"\x00")
    if headers:
        for name in headers:
            values = [value for header_name, value in scope["headers"] if header_name == name]
            digest.update(name + b":" + b"\x01".join(values) + b"\x00")
    digest.update(_canonical_json(body) if mode == "json" else body)
    return digest.digest()
