"""The reverse proxy (SPEC §4): the idempotency middleware in front of a forwarding app.

``build_proxy_app(config)`` returns a pure ASGI app. Requests under ``/_relay/`` are the proxy's
own (health, readiness, metrics) and never reach the middleware; everything else goes through
:class:`~relay_idem.IdempotencyMiddleware` to :class:`Forwarder`, which streams it to the upstream
over one pooled keep-alive client per worker process and streams the answer back.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess
from starlette.types import Message, Receive, Scope, Send

from relay_idem.config import Config
from relay_idem.exceptions import ClientDisconnected, StoreUnavailable
from relay_idem.headers import RawHeaders, end_to_end
from relay_idem.middleware import IdempotencyMiddleware
from relay_idem.problems import (
    STORE_UNAVAILABLE,
    UPSTREAM_FAILED,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNREACHABLE,
    Problem,
    send_problem,
)
from relay_idem.store import Store
from relay_idem.upstream import (
    RequestBody,
    Upstream,
    UpstreamBroken,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
    open_upstream,
)

logger = logging.getLogger(__name__)

RELAY_PATH = "/_relay/"
RELAY_NOT_FOUND = Problem("relay-endpoint-not-found", 404, "No such relay-idem endpoint")
# /_relay/readyz answers within this many seconds even if the store hangs (SPEC §6a: 3 s).
READY_TIMEOUT = 2.0
# Request headers the proxy sets itself (SPEC §6a); whatever the client sent under these names goes.
# Expect goes too: by the time the upstream is called, the proxy has the body (uvicorn sent the 100).
FORWARDED_REPLACED = frozenset({b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"expect"})


def forwarded_headers(scope: Scope) -> RawHeaders:
    """The request headers for the upstream: end-to-end ones, plus ``X-Forwarded-For/Proto/Host``.

    ``X-Forwarded-For`` keeps the addresses it arrived with and appends the immediate client;
    ``Host`` is left to the client library (the upstream's own), the client's goes to ``X-Forwarded-Host``.
    """
    headers: RawHeaders = []
    forwarded_for: list[bytes] = []
    host: bytes | None = None
    for name, value in end_to_end(scope["headers"]):
        if name not in FORWARDED_REPLACED:
            headers.append((name, value))
        elif name == b"x-forwarded-for":
            forwarded_for.append(value)
        elif name == b"host":
            host = value
    client = scope.get("client")
    if client:
        forwarded_for.append(client[0].encode("latin-1"))
    if forwarded_for:
        headers.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode("latin-1")))
    if host is not None:
        headers.append((b"x-forwarded-host", host))
    return headers


def request_target(scope: Scope) -> str:
    """Path and query as the client sent them, still percent-encoded."""
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    target = raw_path.decode("latin-1")
    return f"{target}?{query.decode('latin-1')}" if query else target


async def request_body(receive: Receive) -> RequestBody:
    """The body whole if it came in one message (always so for keyed requests), else a stream."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnected
    first: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return first or None

    async def stream() -> AsyncIterator[bytes]:
        yield first
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return

    return stream()


def mark_not_processed(scope: Scope) -> None:
    """Tell the middleware this response means "not processed", so it releases the key (SPEC §3.6)."""
    claim = (scope.get("extensions") or {}).get("idempotency")
    if claim is not None:
        claim["processed"] = False


class Forwarder:
    """The ASGI app behind the middleware: one request to the upstream, its response streamed back."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await request_body(receive)
            response = await self.upstream.send(scope["method"], request_target(scope), forwarded_headers(scope), body)
        except ClientDisconnected:
            return
        except UpstreamUnreachable as exc:
            logger.warning("relay-idem: upstream unreachable (%s); the request was not sent", exc)
            mark_not_processed(scope)
            await send_problem(send, UPSTREAM_UNREACHABLE, "the upstream could not be connected to; nothing was sent")
            return
        except UpstreamTimeout as exc:
            logger.warning("relay-idem: upstream timed out after the request was sent (%s)", exc)
            await send_problem(send, UPSTREAM_TIMEOUT, "the upstream did not answer in time; it may have processed it")
            return
        except UpstreamBroken as exc:
            logger.warning("relay-idem: upstream failed after the request was sent (%s)", exc)
            await send_problem(send, UPSTREAM_FAILED, "the upstream connection failed; it may have processed it")
            return
        try:
            headers = end_to_end(response.headers)
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            whole = response.arrived_whole()
            if whole is not None:
                # The usual case: the whole response came in the read that held its head.
                await send({"type": "http.response.body", "body": whole, "more_body": False})
                return
            more_body = True
            async for chunk in response.body():
                if chunk:
                    # The last chunk carries the end of the body: one message less for every response.
                    more_body = not response.complete
                    await send({"type": "http.response.body", "body": chunk, "more_body": more_body})
            if more_body:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except UpstreamError as exc:
            # Too late for a problem response: leave it unfinished, so the server closes the
            # connection and the client sees a broken response, not a short one.
            logger.warning("relay-idem: upstream response broke off (%s)", exc)
        finally:
            await response.close()


class ProxyApp:
    """The whole proxy as one ASGI app: lifespan, ``/_relay/`` endpoints, middleware and forwarder."""

    def __init__(self, config: Config, store: Store, upstream: Upstream) -> None:
        self.config = config
        self.store = store
        self.upstream = upstream
        self.idempotent = IdempotencyMiddleware(Forwarder(upstream), store, config.idempotency())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"].startswith(RELAY_PATH):
                await self.relay_endpoint(scope, send)
            else:
                await self.idempotent(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1003, "reason": "relay-idem does not proxy WebSockets"})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # The server has let in-flight requests finish by now; their outcome writes that
                # failed are still being retried, for complete_retry at most (SPEC §3.8).
                await self.idempotent.drain()
                await self.upstream.close()
                await self.store.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def relay_endpoint(self, scope: Scope, send: Send) -> None:
        path = scope["path"][len(RELAY_PATH) :]
        if scope["method"] not in ("GET", "HEAD") or path not in ("healthz", "readyz", "metrics"):
            await send_problem(send, RELAY_NOT_FOUND, f"relay-idem serves GET {RELAY_PATH}healthz, readyz and metrics")
            return
        if path == "metrics":
            content_type, body = metrics_text()
            await send_whole(send, 200, content_type, body)
        elif path == "readyz":
            try:
                async with asyncio.timeout(READY_TIMEOUT):
                    await self.store.ping()
            except (StoreUnavailable, TimeoutError) as exc:
                await send_problem(send, STORE_UNAVAILABLE, f"the store did not answer: {exc or 'timeout'}")
                return
            await send_whole(send, 200, b"application/json", b'{"status":"ready"}')
        else:
            # The worker's pid tells an operator (and a test) which of --workers N answered.
            await send_whole(send, 200, b"application/json", b'{"status":"ok","pid":%d}' % os.getpid())


async def send_whole(send: Send, status: int, content_type: bytes, body: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    start: Message = {"type": "http.response.start", "status": status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})


def metrics_text() -> tuple[bytes, bytes]:
    """Prometheus text for this process, or summed over every worker in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return CONTENT_TYPE_LATEST.encode(), generate_latest(registry)
    return CONTENT_TYPE_LATEST.encode(), generate_latest(REGISTRY)


def build_proxy_app(config: Config, *, store: Store | None = None, upstream: Upstream | None = None) -> ProxyApp:
    """The proxy for ``config``. ``store`` and ``upstream`` default to the ones the config names."""
    return ProxyApp(
        config,
        store if store is not None else config.open_store(),
        upstream
        if upstream is not None
        else open_upstream(config.upstream_client, config.upstream, timeout=config.upstream_timeout),
    )
