"""The proxy's default upstream client: keep-alive connections on asyncio transports, responses parsed by llhttp.

One :class:`PooledUpstream` per worker process holds up to ``MAX_CONNECTIONS`` connections to the
upstream origin. A request goes out in one write (request line, ``Host``, the caller's header bytes
joined as they came, the framing header, and the body when it is bytes); a streamed body follows
with ``Content-Length`` when the caller gave one, else chunked. Responses are parsed by
``httptools.HttpResponseParser`` (llhttp): its callbacks only collect bytes, and the body reaches
the caller chunk by chunk as it arrives, reading paused past ``HIGH_WATER`` buffered bytes.

What it handles, and how:

- Framing of responses: ``Content-Length``, chunked, bodyless (``HEAD``, 1xx, 204, 304: llhttp
  knows the statuses; after a ``HEAD`` the parser is replaced, since llhttp cannot be told the
  method), close-delimited (no length: the body ends at EOF, which llhttp cannot be fed, so EOF
  after headers without a length completes it). Informational 1xx responses are skipped.
- Keep-alive: a connection goes back to the pool once its response is complete and its request
  was sent whole, unless the upstream said ``Connection: close`` (or spoke HTTP/1.0), in which case
  it is closed. The pool hands out the most recently used connection first.
- An idle connection the upstream closes (its keep-alive timeout, a restart) leaves the pool when
  the close arrives (``eof_received`` / ``connection_lost``), not on a timer of ours. A connection
  idle for longer than ``RECHECK_IDLE_AFTER`` gets one turn of the event loop before it is
  written to, so a close already on its way in is seen first.
- The upstream's keep-alive timeout is learnt from those closes (the last one counts): a pooled
  connection idle for nearly that long (``KEEP_ALIVE_MARGIN``) is closed rather than reused, since
  the upstream's close could cross our request on the wire — which would make it ambiguous.
  Before the first such close, a connection idle for ``UNLEARNT_REUSE_LIMIT`` is not reused.
- Retries (issue 9, item 4): a request is sent on another connection only when it provably never
  reached the upstream: the connection was found closed before any byte was written, or the very
  first write failed at once (the socket refused it: nothing left). Once a byte has left, every
  failure is final: a close or reset before the response is :class:`UpstreamBroken`, even on a
  reused connection, because the upstream may have read the request and acted on it.
- Connect failure (refused, DNS, ``timeout`` elapsed): :class:`UpstreamUnreachable`, nothing sent.
  All ``MAX_CONNECTIONS`` busy for ``timeout``: also unreachable (nothing was sent).
- No response headers within ``timeout`` of the request being written, or no body bytes for
  ``timeout`` while the caller is reading: :class:`UpstreamTimeout`, and the connection is dropped.
  One ``loop.call_at`` handle per connection watches it, re-armed only when it fires early.
- A malformed response (llhttp error, an unexpected upgrade, bytes the upstream sends while no
  request is outstanding): :class:`UpstreamBroken`, connection dropped.
- A request body stream that fails (the client went away): the connection is dropped, the
  error goes to the caller. A response body not read to the end: the connection is dropped.
- A response that comes before the request body was sent whole (an early 413, say): returned
  as is; the connection is not reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

from relay_idem.upstream import (
    MAX_CONNECTIONS,
    RawHeaders,
    RequestBody,
    UpstreamBroken,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

__all__ = ["PooledUpstream"]

HIGH_WATER: Final = 256 * 1024  # response bytes buffered for a slow caller before reading pauses
LOW_WATER: Final = HIGH_WATER // 4
RECHECK_IDLE_AFTER: Final = 0.05  # seconds
# A pooled connection is not reused once it has been idle this close to the upstream's keep-alive timeout.
KEEP_ALIVE_MARGIN: Final = 0.25  # a fraction of that timeout ...
KEEP_ALIVE_MARGIN_MAX: Final = 1.0  # ... and at most this many seconds
# Until the upstream has closed an idle connection (and so told us its keep-alive timeout), a pooled
# connection idle this long is not reused: shorter than the common timeouts (gunicorn 2 s, uvicorn
# and Node 5 s, nginx 75 s), so even a pool's first keep-alive close cannot cross a request.
UNLEARNT_REUSE_LIMIT: Final = 1.0
# A fresh connection closed before our first byte (an upstream shedding load) is tried this often.
FRESH_ATTEMPTS: Final = 3

_CHUNKED = b"transfer-encoding: chunked\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_NO_DEADLINE: Final = float("inf")


class _Response:
    """One response as it arrives: status and headers, then body chunks for :meth:`body`."""

    __slots__ = ("buffered", "chunks", "connection", "done", "error", "headers", "status", "waiter")

    def __init__(self, connection: _Connection) -> None:
        self.connection: _Connection | None = connection
        self.status = 0
        self.headers: RawHeaders = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.done = False  # the whole body has arrived
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def complete(self) -> bool:
        return self.done and not self.chunks

    def arrived_whole(self) -> bytes | None:
        if not self.done:
            return None
        body = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        return body

    async def body(self) -> AsyncIterator[bytes]:
        chunks = self.chunks
        while True:
            if chunks:
                chunk = chunks.popleft()
                self.buffered -= len(chunk)
                connection = self.connection
                if connection is not None and connection.reading_paused and self.buffered <= LOW_WATER:
                    connection.resume()
                yield chunk
            elif self.done:
                return
            elif self.error is not None:
                raise self.error
            else:
                waiter = self.waiter = asyncio.get_running_loop().create_future()
                await waiter
                self.waiter = None

    async def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None and not self.done:
            # The caller stopped before the end: the rest of the body would arrive as garbage.
            connection.drop()


class _Connection(asyncio.Protocol):
    """One connection to the upstream; at most one request on it at a time."""

    def __init__(self, pool: PooledUpstream, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False  # EOF or connection lost: never written to again
        self.idle_since = 0.0
        self.response: _Response | None = None  # the exchange in progress
        self.head: asyncio.Future[_Response] | None = None  # resolves when its headers are complete
        self.headers: RawHeaders = []
        self.method_is_head = False
        self.sent_whole = False  # the request has been written to the end
        self.length_known = False  # Content-Length or chunked: EOF mid-body is a failure
        self.informational = False
        self.reset_parser = False
        self.reading_paused = False
        self.drain: asyncio.Future[None] | None = None
        self.deadline = _NO_DEADLINE
        self.timer: asyncio.TimerHandle | None = None

    # --- transport callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            self.drop()  # nothing was asked: whatever this is, the connection can't be trusted
            return
        if self.head is None:
            self.deadline = self.loop.time() + self.pool.timeout  # body bytes: the caller is reading
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamBroken("the upstream switched protocols, which was not asked for"))
        except Exception as exc:  # llhttp's errors, and our callbacks' objections
            self.fail(UpstreamBroken(f"malformed response from the upstream: {type(exc).__name__}: {exc}"))
        if self.reset_parser:
            self.reset_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool:
        self.closed = True
        response = self.response
        if response is None:
            self.pool.closed_while_idle(self)
        if response is not None and self.head is None and not self.length_known and not self.informational:
            self.finish()  # a close-delimited body ends here
        else:
            self.fail(UpstreamBroken("the upstream closed the connection before the response was complete"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.response is None and not self.closed:
            self.pool.closed_while_idle(self)  # a reset, without the EOF first
        self.closed = True
        if self.response is not None:
            self.fail(UpstreamBroken(f"the connection to the upstream was lost: {exc or 'closed'}"))
        self.wake_drain()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pool.forget(self)

    def pause_writing(self) -> None:
        self.drain = self.loop.create_future()

    def resume_writing(self) -> None:
        self.wake_drain()

    def wake_drain(self) -> None:
        drain, self.drain = self.drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.headers = []
        self.length_known = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.length_known = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.informational = 100 <= status < 200
        if self.informational:
            return  # 103 Early Hints and the like: the real response follows
        response, head = self.response, self.head
        if response is None or head is None:
            raise RuntimeError("response headers while no request is outstanding")
        response.status = status
        response.headers = self.headers
        self.head = None
        self.watch()  # from now on the deadline bounds each wait for body bytes
        head.set_result(response)
        if status == 204 or status == 304:
            self.length_known = True
        elif self.method_is_head:
            # llhttp would wait for the body the headers announce; a response to HEAD has none.
            self.reset_parser = True
            self.finish(reuse=self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is None:
            raise RuntimeError("body bytes while no request is outstanding")
        response.chunks.append(body)
        response.buffered += len(body)
        if response.buffered > HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        response.wake()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
        elif self.response is not None:  # (a response to HEAD was finished at its headers)
            self.finish(reuse=self.parser.should_keep_alive())

    # --- one exchange --------------------------------------------------------------------------

    def start(self, method_is_head: bool) -> _Response:
        response = self.response = _Response(self)
        self.head = self.loop.create_future()
        self.method_is_head = method_is_head
        self.sent_whole = False
        self.informational = False
        return response

    def watch(self) -> None:
        """Give the upstream ``timeout`` seconds from now to make progress."""
        self.deadline = self.loop.time() + self.pool.timeout
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self.check_deadline)

    def unwatch(self) -> None:
        """We are the ones waiting (for the client's body): the upstream owes nothing meanwhile."""
        self.deadline = _NO_DEADLINE

    def finish(self, *, reuse: bool = False) -> None:
        """The response is complete: hand the connection back, or close it."""
        response = self.response
        self.response = None
        self.deadline = _NO_DEADLINE
        if response is not None:
            response.done = True
            response.connection = None
            response.wake()
        if self.reading_paused:
            self.resume()
        if reuse and self.sent_whole and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    def fail(self, error: UpstreamError) -> None:
        """The exchange in progress failed: its caller gets ``error`` and the connection is dropped."""
        response, head = self.response, self.head
        self.response = self.head = None
        self.deadline = _NO_DEADLINE
        if head is not None and not head.done():
            head.set_exception(error)
        if response is not None:
            response.error = error
            response.connection = None
            response.wake()
        self.drop()

    def check_deadline(self) -> None:
        self.timer = None
        if self.response is None or self.deadline == _NO_DEADLINE:
            return
        now = self.loop.time()
        if self.reading_paused:  # a slow caller is not a slow upstream
            self.deadline = now + self.pool.timeout
        if now < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self.check_deadline)
        elif self.head is not None:
            self.fail(UpstreamTimeout(f"no response headers within {self.pool.timeout:g} s"))
        else:
            self.fail(UpstreamTimeout(f"the response body stalled for {self.pool.timeout:g} s"))

    def resume(self) -> None:
        self.reading_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def drop(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class PooledUpstream:
    """:class:`~relay_idem.upstream.Upstream` on a pool of keep-alive connections to ``base_url``."""

    def __init__(self, base_url: str, *, timeout: float, max_connections: int = MAX_CONNECTIONS) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL with a host: {base_url!r}")
        default_port = 443 if parts.scheme == "https" else 80
        self.host = parts.hostname
        self.port = parts.port or default_port
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        authority = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != default_port:
            authority += f":{self.port}"
        self.host_line = b"host: " + authority.encode("ascii" if authority.isascii() else "idna") + b"\r\n"
        self.prefix = parts.path.rstrip("/").encode("latin-1")
        self.timeout = timeout
        self.max_connections = max_connections
        self.idle: dict[_Connection, None] = {}  # insertion-ordered: the last one in goes out first
        self.connections: set[_Connection] = set()
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self.connecting = 0
        # Learnt from the upstream: how long it let the last connection it closed sit idle.
        self.keep_alive_timeout = float("inf")
        self.reuse_limit = UNLEARNT_REUSE_LIMIT
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop of the first request (a pool can't be built outside one, nor shared between loops)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # --- the Upstream interface ----------------------------------------------------------------

    async def send(self, method: str, target: str, headers: RawHeaders, body: RequestBody) -> _Response:
        """Send the request; return once the response headers are in (the body streams on)."""
        head, content = self.encode_head(method, target, headers, body)
        method_is_head = method == "HEAD"
        fresh_attempts = 0
        while True:
            connection = self.reusable()
            fresh = 0
            if connection is None:
                connection, fresh = await self.acquire()
            transport = connection.transport
            if connection.closed or transport is None:
                # Found closed before any byte was written: the request provably never left.
                fresh_attempts += fresh
                if fresh_attempts >= FRESH_ATTEMPTS:
                    raise UpstreamUnreachable("the upstream closed every new connection before the request")
                continue
            response = connection.start(method_is_head)
            if isinstance(content, bytes) or content is None:
                transport.write(head + content if content else head)
                connection.sent_whole = True
            else:
                transport.write(head)
            if not transport.is_closing():
                break
            # The very first write was refused at once (asyncio and uvloop report a failed first
            # send synchronously; later failures come as connection_lost): no byte left.
            connection.response = connection.head = None
            connection.closed = True
            fresh_attempts += fresh
            if fresh_attempts >= FRESH_ATTEMPTS:
                raise UpstreamUnreachable("the upstream refused the first write on every new connection")
        head_future = connection.head
        assert head_future is not None
        try:
            if isinstance(content, tuple):
                await self.send_streamed(connection, head_future, content)
            else:
                connection.watch()
            await head_future
        except BaseException:
            connection.drop()
            raise
        return response

    async def send_streamed(
        self,
        connection: _Connection,
        head: asyncio.Future[_Response],
        content: tuple[AsyncIterable[bytes], int | None],
    ) -> None:
        """Stream the body while watching for the response: an early answer (a 413, a 401) stops it.

        A task of its own, so a client that stalls mid-body does not hold back a response the
        upstream already gave. The connection is not reused after an early answer.
        """
        writer = asyncio.ensure_future(self.stream_body(connection, head, content))
        try:
            await asyncio.wait((writer, head), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not writer.done():
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
        if not writer.cancelled():
            writer.result()  # the body's own failure (the client went away), if any

    async def close(self) -> None:
        """Close every connection, idle or not."""
        for connection in list(self.connections):
            connection.close()
        self.idle.clear()
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- the request -----------------------------------------------------------------------------

    def encode_head(
        self, method: str, target: str, headers: RawHeaders, body: RequestBody
    ) -> tuple[bytes, bytes | tuple[AsyncIterable[bytes], int | None] | None]:
        """The request head as one bytes object, and what follows it.

        The framing is ours: a ``Content-Length`` the caller gave is kept only if it is right for
        a bytes body (or names the length of a stream); ``Transfer-Encoding`` never passes.
        """
        given: bytes | None = None
        clean = True
        for name, value in headers:
            if name == b"content-length":
                if given is not None:
                    clean = False
                given = value
            elif name == b"transfer-encoding":
                clean = False
        content: bytes | tuple[AsyncIterable[bytes], int | None] | None
        if isinstance(body, bytes):
            length = b"%d" % len(body)
            framing = b"" if clean and given == length else b"content-length: " + length + b"\r\n"
            if framing:
                clean = False
            content = body
        elif body is None:
            framing = b""
            if given is not None and (given != b"0" or not clean):
                clean, framing = False, b"content-length: 0\r\n"
            content = None
        else:
            size = int(given) if given is not None and clean and given.isdigit() else None
            if given is not None and size is None:
                clean = False
            framing = b"" if size is not None else _CHUNKED
            content = (body, size)
        if not clean:
            headers = [(n, v) for n, v in headers if n != b"content-length" and n != b"transfer-encoding"]
        lines = b"\r\n".join(map(b": ".join, headers))
        request_line = b"%s %s%s HTTP/1.1\r\n" % (method.encode("ascii"), self.prefix, target.encode("latin-1"))
        if lines:
            return b"".join((request_line, self.host_line, lines, b"\r\n", framing, b"\r\n")), content
        return b"".join((request_line, self.host_line, framing, b"\r\n")), content

    async def stream_body(
        self,
        connection: _Connection,
        head: asyncio.Future[_Response],
        content: tuple[AsyncIterable[bytes], int | None],
    ) -> None:
        """Write a streamed body after the head, waiting for the upstream to take it in."""
        body, size = content
        transport = connection.transport
        assert transport is not None
        remaining = size
        connection.unwatch()
        try:
            async for chunk in body:
                if head.done() or connection.closed:
                    return  # answered early, or failed: the response (or its error) says what happened
                if not chunk:
                    continue
                if remaining is None:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    remaining -= len(chunk)
                    if remaining < 0:
                        raise ValueError("the request body is longer than its Content-Length")
                    transport.write(chunk)
                if connection.drain is not None:
                    connection.watch()  # the upstream is not reading what we send: bounded too
                    await connection.drain
                    if not head.done():
                        connection.unwatch()
        except BaseException:
            if not head.done() or head.exception() is not None:
                connection.drop()  # half a request went out: nothing else can use this connection
            raise
        if head.done() or connection.closed:
            return
        if remaining is None:
            transport.write(_LAST_CHUNK)
        elif remaining:
            connection.drop()
            raise ValueError("the request body is shorter than its Content-Length")
        connection.sent_whole = True
        connection.watch()

    # --- the pool ------------------------------------------------------------------------------

    def reusable(self) -> _Connection | None:
        """The pooled connection used last, if it was idle only briefly: no await on the hot path."""
        idle = self.idle
        if idle:
            connection = next(reversed(idle))
            idle_for = self.loop.time() - connection.idle_since
            if idle_for <= RECHECK_IDLE_AFTER and idle_for < self.reuse_limit:
                del idle[connection]
                return connection
        return None

    async def acquire(self) -> tuple[_Connection, int]:
        """A connection to write to, and 1 if it is new (0 if it was pooled)."""
        idle = self.idle
        while idle:
            connection, _ = idle.popitem()
            idle_for = self.loop.time() - connection.idle_since
            if idle_for >= self.reuse_limit:
                connection.close()  # the upstream is about to close it: its close could cross our request
                continue
            if idle_for > RECHECK_IDLE_AFTER:
                # Let a close that is already on the wire arrive before we write.
                try:
                    await asyncio.sleep(0)
                except BaseException:
                    connection.close()  # out of the pool already: don't leave it open and unused
                    raise
            if not connection.closed:
                return connection, 0
        if len(self.connections) + self.connecting >= self.max_connections:
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                async with asyncio.timeout(self.timeout):
                    handed = await waiter
            except TimeoutError:
                raise UpstreamUnreachable(f"all {self.max_connections} upstream connections stayed busy") from None
            finally:
                if not waiter.done():
                    waiter.cancel()
            if handed is not None:
                return handed, 0
            return await self.acquire()
        return await self.connect(), 1

    async def connect(self) -> _Connection:
        self.connecting += 1
        try:
            async with asyncio.timeout(self.timeout):
                _, protocol = await self.loop.create_connection(
                    lambda: _Connection(self, self.loop), self.host, self.port, ssl=self.ssl
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnreachable(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.connecting -= 1
        connection = protocol
        if not connection.closed:
            self.connections.add(connection)
        return connection

    def release(self, connection: _Connection) -> None:
        """A connection whose exchange completed: to the first waiter, else to the idle pool."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = self.loop.time()
        self.idle[connection] = None

    def closed_while_idle(self, connection: _Connection) -> None:
        """The upstream closed a connection that was waiting in the pool: learn its keep-alive timeout.

        The last such close counts (not the shortest ever seen), so a restart that closes every
        connection at once lowers the limit only until the next ordinary keep-alive close.
        """
        if connection.idle_since:
            timeout = self.loop.time() - connection.idle_since
            self.keep_alive_timeout = timeout
            self.reuse_limit = timeout - min(timeout * KEEP_ALIVE_MARGIN, KEEP_ALIVE_MARGIN_MAX)

    def forget(self, connection: _Connection) -> None:
        """A connection that closed: out of the pool, and its place to whoever waits for one."""
        self.idle.pop(connection, None)
        if connection in self.connections:
            self.connections.discard(connection)
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
