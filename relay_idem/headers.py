"""Header helpers shared by the middleware and the proxy."""

from __future__ import annotations

from collections.abc import Iterable

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1: meaningful for one connection only, never stored, replayed or forwarded.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)


def end_to_end(headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """``headers`` without hop-by-hop ones, including those the ``Connection`` header names."""
    headers = list(headers)
    named = {
        token.strip().lower() for name, value in headers if name.lower() == b"connection" for token in value.split(b",")
    }
    dropped = HOP_BY_HOP | named if named else HOP_BY_HOP
    return [(name, value) for name, value in headers if name.lower() not in dropped]
