"""Reading a keyed request's body, which must be whole before it can be fingerprinted."""

from __future__ import annotations

from starlette.types import Receive

from relay_idem.exceptions import ClientDisconnected

# More digits than any body limit needs: longer Content-Length values are taken as "huge", since
# int() refuses more than 4300 digits.
MAX_LENGTH_DIGITS = 18


def declared_length(value: bytes | None) -> int | None:
    """The length a ``Content-Length`` value declares, or None if it is not a number."""
    if not value or not value.isdigit():
        return None
    return int(value) if len(value) <= MAX_LENGTH_DIGITS else 10**MAX_LENGTH_DIGITS


class BodyTooLarge(Exception):
    """The body is larger than the limit: declared by Content-Length or counted while reading.

    ``read`` is what was read before that was known; ``more_body``: the rest is still to be received.
    """

    def __init__(self, read: bytes = b"", more_body: bool = True) -> None:
        super().__init__()
        self.read = read
        self.more_body = more_body


async def read_body(receive: Receive, *, limit: int, content_length: int | None) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes before reading them if it can."""
    if content_length is not None and content_length > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        if size > limit:
            raise BodyTooLarge(b"".join(chunks), message.get("more_body", False))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
