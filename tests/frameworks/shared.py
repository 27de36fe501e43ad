"""What the framework test apps have in common: the request they send, what they count, the export they stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

MESSAGE = {"to": "+5511999998888", "template": "lembrete_consulta"}
EXPORT_ROWS = 50


class Sent:
    """What an app really did: messages created, background tasks run, exports started, handlers failed."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.notified: list[str] = []
        self.streams = 0
        self.failures = 0


async def export_rows(number: int) -> AsyncIterator[bytes]:
    """The body of export ``number``, one row per chunk, yielding to the loop between chunks."""
    for row in range(EXPORT_ROWS):
        await asyncio.sleep(0)
        yield f"export {number} row {row}\n".encode()


def export_body(number: int) -> bytes:
    return b"".join(f"export {number} row {row}\n".encode() for row in range(EXPORT_ROWS))
