"""relay-idem's aiohttp upstream client (``--upstream-client aiohttp``; ``pip install 'relay-idem[aiohttp]'``).

The default before issue 9 (``relay_idem/upstream_pool.py`` costs less CPU per request and never
sends a request twice at an upstream's keep-alive boundary); kept for comparison and for anyone
who wants aiohttp's behaviour. See ``relay_idem/upstream.py`` for the interface and error mapping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

from relay_idem.upstream import (
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    RawHeaders,
    RequestBody,
    UpstreamBroken,
    UpstreamTimeout,
    UpstreamUnreachable,
)

# Keep idle connections a little shorter than common servers do (uvicorn closes them after 5 s),
# so the pool rarely hands out a connection the upstream is closing at that moment.
KEEPALIVE_EXPIRY = 4.0


def _lowercase(headers: list[tuple[bytes, bytes]]) -> RawHeaders:
    return [(name.lower(), value) for name, value in headers]


class _AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.headers = _lowercase(list(response.raw_headers))

    @property
    def complete(self) -> bool:
        return self.response.content.at_eof()

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeout(f"{type(exc).__name__}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(f"{type(exc).__name__}: {exc}") from exc

    def arrived_whole(self) -> None:
        return None  # aiohttp does not say whether the body is all in: always streamed

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
