"""The proxy's upstream client: one pooled keep-alive client per worker, behind a small interface.

``--upstream-client`` picks the implementation; the choice was made by measurement (issue 9,
``benchmarks/README.md``, "The upstream client"):

- ``httptools`` (default): :class:`~relay_idem.upstream_pool.PooledUpstream`, keep-alive connections
  on asyncio transports with llhttp parsing the responses;
- ``aiohttp``: :class:`~relay_idem.upstream_aiohttp.AiohttpUpstream`, one ``aiohttp.ClientSession``
  (an optional extra: ``pip install 'relay-idem[aiohttp]'``).

Each streams bodies both ways, never decompresses, adds no headers of its own but ``Host``, and maps
its errors onto three outcomes the outcome policy (SPEC §3.6) needs to tell apart:

UpstreamError
├── UpstreamUnreachable  no connection could be made: the request never left (502, key released)
├── UpstreamTimeout      sent, but no response headers within the timeout (504, final)
└── UpstreamBroken       sent, then the connection failed (502, final)
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Literal, Protocol

from relay_idem.exceptions import RelayIdemError

RawHeaders = list[tuple[bytes, bytes]]
RequestBody = bytes | AsyncIterable[bytes] | None
UpstreamClientName = Literal["httptools", "aiohttp"]
UPSTREAM_CLIENTS: tuple[UpstreamClientName, ...] = ("httptools", "aiohttp")

MAX_CONNECTIONS = 512
MAX_HEADER_BYTES = 64 * 1024


class UpstreamError(RelayIdemError):
    """The upstream did not give a whole response."""


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream could be made: the request never left."""


class UpstreamTimeout(UpstreamError):
    """The request was sent but the response did not come in time: it may have been processed."""


class UpstreamBroken(UpstreamError):
    """The connection failed after the request was sent: it may have been processed."""


class UpstreamResponse(Protocol):
    """Status and headers (lowercase names, in order) of a response whose body is still to be read."""

    status: int
    headers: RawHeaders

    @property
    def complete(self) -> bool:
        """True once :meth:`body` has nothing more to give (so the chunk in hand is the last)."""

    def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives, undecoded. Raises :class:`UpstreamError` if it breaks off."""

    def arrived_whole(self) -> bytes | None:
        """The whole body if all of it has arrived already (it is then consumed), else None: read :meth:`body`."""

    async def close(self) -> None:
        """Give the connection back to the pool (or drop it if the body was not read to the end)."""


class Upstream(Protocol):
    """A pooled client for one upstream origin."""

    async def send(self, method: str, target: str, headers: RawHeaders, body: RequestBody) -> UpstreamResponse:
        """Send ``method target`` (path and query, already encoded) and return once headers arrive."""

    async def close(self) -> None:
        """Close every pooled connection."""


def open_upstream(client: UpstreamClientName, base_url: str, *, timeout: float) -> Upstream:
    """The pooled client named ``client`` for ``base_url``."""
    if client == "aiohttp":
        from relay_idem.upstream_aiohttp import AiohttpUpstream  # an extra: Config checks it is installed

        return AiohttpUpstream(base_url, timeout=timeout)
    from relay_idem.upstream_pool import PooledUpstream

    return PooledUpstream(base_url, timeout=timeout)
