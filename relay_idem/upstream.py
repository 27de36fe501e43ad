"""The proxy's upstream client: one pooled keep-alive client per worker, behind a small interface.

Two implementations sit side by side, because the choice was made by measurement
(``benchmarks/proxy_client/RESULTS.md``): :class:`HttpxUpstream` and :class:`AiohttpUpstream`.
Both stream bodies both ways, never decompress, add no headers of their own but ``Host``, and map
their library's errors onto three outcomes the outcome policy (SPEC §3.6) needs to tell apart:

UpstreamError
├── UpstreamUnreachable  no connection could be made: the request never left (502, key released)
├── UpstreamTimeout      sent, but no response headers within the timeout (504, final)
└── UpstreamBroken       sent, then the connection failed (502, final)
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Literal, Protocol

import aiohttp
import httpx
from yarl import URL

from relay_idem.exceptions import RelayIdemError

RawHeaders = list[tuple[bytes, bytes]]
RequestBody = bytes | AsyncIterable[bytes] | None
UpstreamClientName = Literal["httptools", "httpx", "aiohttp"]
UPSTREAM_CLIENTS: tuple[UpstreamClientName, ...] = ("httptools", "httpx", "aiohttp")

# Keep idle connections a little shorter than common servers do (uvicorn closes them after 5 s),
# so the pool rarely hands out a connection the upstream is closing at that moment.
KEEPALIVE_EXPIRY = 4.0
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

    def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives, undecoded. Raises :class:`UpstreamError` if it breaks off."""

    async def close(self) -> None:
        """Give the connection back to the pool (or drop it if the body was not read to the end)."""


class Upstream(Protocol):
    """A pooled client for one upstream origin."""

    async def send(self, method: str, target: str, headers: RawHeaders, body: RequestBody) -> UpstreamResponse:
        """Send ``method target`` (path and query, already encoded) and return once headers arrive."""

    async def close(self) -> None:
        """Close every pooled connection."""


def _lowercase(headers: list[tuple[bytes, bytes]]) -> RawHeaders:
    return [(name.lower(), value) for name, value in headers]


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code
        self.headers = _lowercase(response.headers.raw)

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.aiter_raw():
                yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{type(exc).__name__}: {exc}") from exc
        except httpx.TransportError as exc:
            raise UpstreamBroken(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self.response.aclose()


class HttpxUpstream:
    """:class:`Upstream` on one ``httpx.AsyncClient``; ``transport`` lets tests swap the network out.

    With ``httpx.MockTransport``, answer with ``httpx.Response(..., stream=httpx.ByteStream(body))``:
    a response built with ``content=`` is read at once, and its raw stream is gone.
    """

    def __init__(self, base_url: str, *, timeout: float, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=MAX_CONNECTIONS,
                max_keepalive_connections=MAX_CONNECTIONS,
                keepalive_expiry=KEEPALIVE_EXPIRY,
            ),
            transport=transport,
            follow_redirects=False,
            trust_env=False,
        )

    async def send(self, method: str, target: str, headers: RawHeaders, body: RequestBody) -> _HttpxResponse:
        # A bare httpx.Request carries only our headers (plus Host): the client's defaults
        # (User-Agent, Accept-Encoding, ...) are added by build_request, which we skip.
        request = httpx.Request(method, self.base_url + target, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise UpstreamUnreachable(f"{type(exc).__name__}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{type(exc).__name__}: {exc}") from exc
        except httpx.TransportError as exc:
            raise UpstreamBroken(f"{type(exc).__name__}: {exc}") from exc
        return _HttpxResponse(response)

    async def close(self) -> None:
        await self.client.aclose()


class _AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.headers = _lowercase(list(response.raw_headers))

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeout(f"{type(exc).__name__}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        self.response.release()


class AiohttpUpstream:
    """:class:`Upstream` on one ``aiohttp.ClientSession``, created on first use (it needs a running loop)."""

    # Everything aiohttp would add on its own; the proxy forwards the client's headers instead.
    SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

    def __init__(self, base_url: str, *, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_EXPIRY),
                timeout=self.timeout,
                auto_decompress=False,
                skip_auto_headers=self.SKIP_AUTO_HEADERS,
                # One session serves every client of the proxy: it must never replay an upstream's cookies.
                cookie_jar=aiohttp.DummyCookieJar(),
                # As lenient as uvicorn in front of it, rather than aiohttp's 8 KiB default.
                max_line_size=MAX_HEADER_BYTES,
                max_field_size=MAX_HEADER_BYTES,
            )
        return self.session

    async def send(self, method: str, target: str, headers: RawHeaders, body: RequestBody) -> _AiohttpResponse:
        url = URL(self.base_url + target, encoded=True)
        text_headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
        try:
            response = await self._session().request(
                method, url, headers=text_headers, data=body, allow_redirects=False, compress=None
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamUnreachable(f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(f"{type(exc).__name__}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(f"{type(exc).__name__}: {exc}") from exc
        return _AiohttpResponse(response)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def open_upstream(client: UpstreamClientName, base_url: str, *, timeout: float) -> Upstream:
    """The pooled client named ``client`` for ``base_url``."""
    if client == "httptools":
        from relay_idem.upstream_pool import PooledUpstream

        return PooledUpstream(base_url, timeout=timeout)
    if client == "aiohttp":
        return AiohttpUpstream(base_url, timeout=timeout)
    return HttpxUpstream(base_url, timeout=timeout)
