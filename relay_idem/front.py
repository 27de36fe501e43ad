"""The proxy's HTTP/1.1 front: one ``asyncio.Protocol`` per client connection, parsed by llhttp (httptools).

It hands :class:`~relay_idem.proxy.ProxyApp` a minimal ASGI ``http`` scope per request and writes
its answer back with as few writes as it can (a head that announces a Content-Length waits for its
body; any other goes at the end of the event-loop step unless a body message takes it along), so a
whole response usually leaves in one write. Each connection has one timer (``loop.call_at``) that
serves every deadline below; it wakes at most every ``Limits.tick`` seconds and re-arms itself, so a
request costs no timer operation at all.

What can go wrong, and what happens:

- Malformed request (llhttp refuses it: Content-Length with Transfer-Encoding, two Content-Lengths,
  a bad chunk size, obsolete line folding, bad characters): 400 problem+json if no response has
  started, and the connection closes. Nothing after the error is parsed, so no second request
  hidden in a body is ever seen.
- Request head (request line and headers) over ``max_header_bytes``: 431 problem+json; at most
  the limit is fed to the parser, the rest is read and dropped, and the connection closes.
- Head not complete ``header_timeout`` after its first byte (or after the connection opened): the
  connection is closed, no answer.
- Body that sends nothing for ``body_timeout`` while the proxy is reading it: 408 problem+json if no
  response has started (a keyed request's body is read whole before its key is claimed, so the
  key stays free), else the connection is closed; the app sees ``http.disconnect``.
- Client that reads none of its response for ``send_timeout`` (the write buffer stays above its
  high-water mark): the connection is aborted; the app's further sends are dropped, so it runs to
  its end and the idempotency record is completed all the same.
- More than ``max_connections`` open connections: a new one gets 503 problem+json at once and is
  closed; the others are served as before.
- Idle keep-alive connection: closed after ``keepalive_timeout`` (5 s, as uvicorn).
- Pipelined requests: answered one at a time in order; while one waits, reading pauses.
- Client gone: the app's ``receive`` returns ``http.disconnect``, its ``send`` returns without writing.
- App raises: 500 problem+json if nothing was sent yet, else the connection is closed (the client
  sees a cut response). App returns without finishing its response: the connection is closed.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httptools
from starlette.types import ASGIApp, Message

from relay_idem.problems import (
    APP_ERROR,
    HEADER_TOO_LARGE,
    MALFORMED_REQUEST,
    REQUEST_TIMEOUT,
    TOO_MANY_CONNECTIONS,
    Problem,
    problem_body,
    problem_headers,
)

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("uvicorn.access")

INF = float("inf")
# Request body bytes held for the app before reading pauses (as uvicorn's flow control).
HIGH_WATER = 64 * 1024
# After an error answer, input is read and dropped this long (nginx's lingering close), so the
# client gets to read the answer instead of a reset.
LINGER = 2.0
# A passed deadline is acted on this much later, after the loop has read its sockets once more.
CONFIRM_DELAY = 0.001
ASGI = {"version": "3.0", "spec_version": "2.3"}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CRLF = b"\r\n"
HEADER_SEPARATOR = b": "


def status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


STATUS_LINES = {status: status_line(status) for status in range(100, 600)}


def whole_response(problem: Problem, detail: str, retry_after: int | None = None) -> bytes:
    """A complete problem+json response that closes the connection, built once."""
    body = problem_body(problem, detail)
    headers = [*problem_headers(body, retry_after), (b"connection", b"close")]
    return STATUS_LINES[problem.status] + b"".join(name + b": " + value + CRLF for name, value in headers) + CRLF + body


MALFORMED = whole_response(MALFORMED_REQUEST, "the request is not valid HTTP/1.1 (framing or syntax)")
TOO_LARGE = whole_response(HEADER_TOO_LARGE, "the request line and headers are larger than the proxy accepts")
BODY_TIMEOUT = whole_response(REQUEST_TIMEOUT, "the request body stalled; nothing was sent upstream")
OVER_CAPACITY = whole_response(TOO_MANY_CONNECTIONS, "this proxy process has no room for another connection", 1)
APP_FAILED = whole_response(APP_ERROR, "the proxy failed while processing this request")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may cost a worker (SPEC §4, hostile clients); nginx's defaults as the model."""

    max_header_bytes: int = 64 * 1024
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    max_connections: int = 10_000
    keepalive_timeout: float = 5.0

    @property
    def tick(self) -> float:
        """The connection timer's longest sleep: no deadline is ever nearer than this when it is set."""
        return min(self.header_timeout, self.body_timeout, self.send_timeout, self.keepalive_timeout)


class Front:
    """One worker's connections: the app, the limits, and what graceful shutdown waits for."""

    def __init__(self, app: ASGIApp, limits: Limits, *, access_log: bool = False) -> None:
        self.app = app
        self.limits = limits
        self.access_log = access_log
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False

    def protocol(self) -> Connection:
        return Connection(self)

    async def shutdown(self) -> None:
        """Close idle connections, let every request in flight finish (its record completed), then return."""
        self.stopping = True
        for connection in list(self.connections):
            connection.shutdown()
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


class Connection(asyncio.Protocol):
    """One client connection. The parser's callbacks collect the request; a :class:`Cycle` runs it."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.app = front.app
        self.limits = front.limits
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.now = 0.0  # loop time at the start of the current read
        # The request being parsed.
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.expect_continue = False
        self.in_head = True  # bytes fed now belong to a request head (or to the idle gap before one)
        self.head_room = self.limits.max_header_bytes
        self.finished_in_read = False  # a message ended inside the current read
        self.head_mid_read = False  # so this head's first bytes were not counted: check it whole
        self.head_started = False  # a head has begun and is not complete (its deadline is running)
        self.parsing: Cycle | None = None  # the request whose body is arriving
        self.current: Cycle | None = None  # the request being answered
        self.pipeline: deque[Cycle] = deque()
        # States of the connection.
        self.discarding = False  # after an error answer or a last request: input is dropped
        self.read_paused = False
        self.write_paused = False
        self.drained: asyncio.Future[None] | None = None
        # One timer serves both deadlines.
        self.read_deadline = INF
        self.write_deadline = INF
        self.timer: asyncio.TimerHandle | None = None
        self.confirming = False  # a deadline passed; checked again after the sockets were read

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client = transport.get_extra_info("peername")
        self.server = transport.get_extra_info("sockname")
        now = self.loop.time()
        if len(self.front.connections) >= self.limits.max_connections or self.front.stopping:
            # No lingering here: a flood of connections must not hold more descriptors than it has to.
            self.discarding = True
            transport.write(OVER_CAPACITY)  # type: ignore[attr-defined]
            transport.close()
            return
        self.front.connections.add(self)
        self.read_deadline = now + self.limits.header_timeout
        self.timer = self.loop.call_at(min(self.read_deadline, now + self.limits.tick), self.on_timer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for cycle in (self.current, self.parsing, *self.pipeline):
            if cycle is not None:
                cycle.disconnect()
        self.pipeline.clear()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        self.now = self.loop.time()
        self.finished_in_read = False
        if self.in_head:
            if len(data) > self.head_room:
                self.feed_limited(data)
                return
            self.head_room -= len(data)
        self.feed(data)

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed client gets nothing more (as uvicorn)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_deadline = self.loop.time() + self.limits.send_timeout

    def resume_writing(self) -> None:
        self.write_paused = False
        self.write_deadline = INF
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    # --- parsing --------------------------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade (WebSocket) request: the proxy answers it as a plain request, then closes.
            self.discarding = True
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, RefusedHead):
                raise
            self.refuse(exc.__context__.answer, self.now)
        except httptools.HttpParserError:
            self.malformed()

    def feed_limited(self, data: bytes) -> None:
        """A read that would take the head past the limit: feed only up to it, and refuse if it is not done."""
        room, view = self.head_room, memoryview(data)
        self.head_room = 0
        self.feed(view[:room])
        if self.discarding:
            return
        if self.in_head and not self.finished_in_read:
            self.refuse(TOO_LARGE, self.now)
            return
        rest = view[room:]
        if self.in_head:
            if len(rest) > self.head_room:
                self.feed_limited(bytes(rest))
                return
            self.head_room -= len(rest)
        self.feed(rest)

    def malformed(self) -> None:
        """llhttp refused the input: 400 unless a response is under way (then just close)."""
        cycle = self.parsing
        if cycle is not None and cycle.complete and not cycle.keep_alive:
            # "Data after Connection: close": the last request stands, the extra bytes are ignored.
            self.discarding = True
            return
        answering = self.current is not None and self.current.started
        for waiting in (self.current, cycle, *self.pipeline):
            if waiting is not None:
                waiting.disconnect()
        if answering:
            self.transport.close()
        else:
            self.refuse(MALFORMED, self.now)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.expect_continue = False
        self.head_mid_read = self.finished_in_read
        self.head_started = True
        self.read_deadline = self.now + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_started = False
        if self.head_mid_read and self.head_size() > self.limits.max_header_bytes:
            raise HeadTooLarge
        parser = self.parser
        url = self.url
        if url[:1] == b"/" and b"#" not in url:
            raw_path, _, query = url.partition(b"?")
        else:
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": ASGI,
            "http_version": parser.get_http_version(),
            "method": parser.get_method().decode("ascii"),
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": self.headers,
            "client": self.client,
            "server": self.server,
        }
        keep_alive = parser.should_keep_alive() and not self.front.stopping
        if parser.should_upgrade():
            # llhttp skips the body of an Upgrade (or CONNECT) request: one that has a body is refused.
            # One without is answered as a plain request (Upgrade is hop-by-hop), then the connection closes.
            if any(name in (b"content-length", b"transfer-encoding") for name, _ in self.headers):
                raise UpgradeWithBody
            keep_alive = False
        cycle = Cycle(self, scope, keep_alive, self.expect_continue)
        self.parsing = cycle
        self.read_deadline = self.now + self.limits.body_timeout
        if self.current is None:
            self.start(cycle)
        else:
            # A pipelined request: it waits for the one being answered, and so does the input.
            self.pipeline.append(cycle)
            self.pause_reading()

    def head_size(self) -> int:
        """A head's size from its parts, for one whose first bytes came in the same read as the last body."""
        return len(self.url) + 16 + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        assert cycle is not None
        self.read_deadline = self.now + self.limits.body_timeout
        if cycle.gone:
            return  # answered or disconnected already: the rest of its body is dropped
        cycle.body += body
        if len(cycle.body) > HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.parsing
        assert cycle is not None
        cycle.complete = True
        cycle.wake()
        self.in_head = True
        self.head_room = self.limits.max_header_bytes
        self.finished_in_read = True
        self.read_deadline = INF
        if not cycle.keep_alive:
            self.discarding = True
        elif cycle.finished:
            self.idle_or_next()

    # --- flow control and deadlines -------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
            self.read_deadline = INF  # waiting on us, not on the client

    def resume_reading(self) -> None:
        if self.read_paused and not self.discarding:
            self.read_paused = False
            self.transport.resume_reading()
            parsing = self.parsing
            waiting_for = self.limits.body_timeout if parsing and not parsing.complete else self.limits.header_timeout
            self.read_deadline = self.loop.time() + waiting_for

    async def drain(self) -> None:
        if self.drained is None or self.drained.done():
            self.drained = self.loop.create_future()
        await self.drained

    def on_timer(self) -> None:
        now = self.loop.time()
        expired = now >= self.write_deadline or now >= self.read_deadline
        if expired and not self.confirming:
            # The loop runs timers before it reads the sockets: after a stall of the whole process,
            # input or drained output may be waiting that would move the deadline. Look once more
            # after the next poll for I/O.
            self.confirming = True
            self.timer = self.loop.call_at(now + CONFIRM_DELAY, self.on_timer)
            return
        self.confirming = False
        if now >= self.write_deadline:
            logger.info("relay-idem: client %s did not read its response for %s s; disconnected", self.client,
                        self.limits.send_timeout)  # fmt: skip
            self.timer = None
            self.transport.abort()
            return
        if now >= self.read_deadline:
            self.timer = None
            self.read_timed_out()
            return
        deadline = min(self.read_deadline, self.write_deadline, now + self.limits.tick)
        self.timer = self.loop.call_at(deadline, self.on_timer)

    def read_timed_out(self) -> None:
        if self.discarding or self.head_started:
            # Lingering after an answer, or a head that did not come in time: drop the connection.
            self.transport.abort()
            return
        if self.in_head or self.parsing is None:
            self.transport.close()  # idle between requests (or since it opened): an orderly close
            return
        cycle = self.parsing
        if cycle.started:
            # Too late for a 408: cut the connection (abort: a close would wait for the client to
            # read what is buffered, and no timer is left to end that wait).
            cycle.disconnect()
            self.transport.abort()
            return
        logger.info("relay-idem: request body from %s stalled for %s s; 408", self.client, self.limits.body_timeout)
        cycle.disconnect()
        self.refuse(BODY_TIMEOUT, self.loop.time())

    def refuse(self, response: bytes, now: float) -> None:
        """Send a whole error answer, then read and drop input for a moment before closing.

        While an earlier request is still being answered, its answer comes first: the connection
        closes after it, and this one gets no answer of its own.
        """
        self.discarding = True
        current = self.current
        if current is not None and not current.disconnected:
            current.keep_alive = False
            for waiting in self.pipeline:
                waiting.disconnect()
            self.pipeline.clear()
            return
        self.transport.write(response)
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # The linger may end sooner than the timer's next wake-up (it is the one deadline shorter
        # than the tick): re-arm it, which only error answers pay for.
        self.read_deadline = now + LINGER
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(self.read_deadline, self.on_timer)

    # --- running requests -----------------------------------------------------------------------------

    def start(self, cycle: Cycle) -> None:
        self.current = cycle
        cycle.task = task = self.loop.create_task(cycle.run())
        self.front.tasks.add(task)  # for graceful shutdown; the task takes itself out when it ends

    def response_done(self, cycle: Cycle) -> None:
        """The response to ``cycle`` has been written whole: on to the next request, or close."""
        if self.front.access_log:
            self.log_access(cycle)
        self.current = None
        if not cycle.keep_alive or self.front.stopping:
            self.transport.close()
        elif cycle.complete:
            self.idle_or_next()
        # else: the rest of its body is still arriving; on_message_complete goes on from there

    def log_access(self, cycle: Cycle) -> None:
        """One line per request, as uvicorn's access log (its formatter is configured for it)."""
        scope = cycle.scope
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        version, status = scope["http_version"], cycle.status
        access_logger.info('%s - "%s %s HTTP/%s" %d', client, scope["method"], target, version, status)

    def idle_or_next(self) -> None:
        if self.current is not None:
            return
        if self.pipeline:
            self.start(self.pipeline.popleft())
            self.resume_reading()
        elif self.parsing is not None and self.parsing.finished and self.parsing.complete:
            self.parsing = None
            self.resume_reading()
            if not self.head_started:
                self.read_deadline = self.loop.time() + self.limits.keepalive_timeout

    def shutdown(self) -> None:
        """Graceful shutdown: an idle connection closes now, a busy one after its response."""
        if self.current is None and not self.pipeline:
            self.transport.close()


class RefusedHead(Exception):
    """Raised from a parser callback to refuse a request head with ``answer``."""

    answer = MALFORMED


class HeadTooLarge(RefusedHead):
    """The head is over ``max_header_bytes``."""

    answer = TOO_LARGE


class UpgradeWithBody(RefusedHead):
    """An Upgrade or CONNECT request with a body, which llhttp would not parse."""


class Cycle:
    """One request and its response: the ASGI ``receive`` and ``send`` the app is given."""

    __slots__ = (
        "body",
        "body_taken",
        "chunked",
        "complete",
        "connection",
        "continue_sent",
        "delimited_by_close",
        "disconnected",
        "finished",
        "head",
        "head_only",
        "keep_alive",
        "remaining",
        "scope",
        "started",
        "status",
        "task",
        "waiter",
    )

    def __init__(self, connection: Connection, scope: dict[str, Any], keep_alive: bool, expect_continue: bool) -> None:
        self.connection = connection
        self.scope = scope
        self.keep_alive = keep_alive
        self.body = b""
        self.complete = False  # the whole request body has arrived
        self.body_taken = False  # ... and the app has received all of it
        self.continue_sent = not expect_continue
        self.waiter: asyncio.Future[None] | None = None
        self.disconnected = False
        self.started = False
        self.finished = False
        self.head: bytes | None = None  # the response head, held for the first body message
        self.head_only = False
        self.chunked = False
        self.delimited_by_close = False
        self.remaining = 0
        self.status = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def gone(self) -> bool:
        return self.finished or self.disconnected

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def disconnect(self) -> None:
        self.disconnected = True
        self.wake()

    async def run(self) -> None:
        connection = self.connection
        try:
            await connection.app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            scope = self.scope
            logger.error("relay-idem: the proxy failed on %s %s", scope["method"], scope["path"], exc_info=exc)
            self.abandon(APP_FAILED)
        else:
            if not self.finished and not self.disconnected:
                # The forwarder leaves a response unfinished when the upstream broke off mid-body.
                self.abandon(APP_FAILED)
        finally:
            if self.task is not None:
                connection.front.tasks.discard(self.task)

    def abandon(self, answer: bytes) -> None:
        connection = self.connection
        self.keep_alive = False
        if self.disconnected or connection.transport.is_closing():
            return
        if not self.started:
            connection.transport.write(answer)
        elif self.head is not None:
            connection.transport.write(self.head)
        self.finished = True
        connection.discarding = True
        connection.current = None
        connection.transport.close()

    async def receive(self) -> Message:
        connection = self.connection
        if not self.continue_sent:
            self.continue_sent = True
            if not self.complete and not self.started and not self.disconnected:
                connection.transport.write(CONTINUE)
        while not (self.disconnected or self.finished):
            body = self.body
            if body or (self.complete and not self.body_taken):
                self.body = b""
                self.body_taken = self.complete
                if connection.read_paused and connection.parsing is self:
                    connection.resume_reading()
                return {"type": "http.request", "body": body, "more_body": not self.complete}
            if connection.read_paused and connection.parsing is self:
                connection.resume_reading()
            # Waits for more body; after the whole body, for the disconnect (or the response's end).
            self.waiter = connection.loop.create_future()
            await self.waiter
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        connection = self.connection
        if connection.write_paused and not self.disconnected:
            await connection.drain()
        if self.disconnected:
            return
        if not self.started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {message['type']!r}")
            self.start_response(message["status"], message.get("headers", ()))
            return
        if self.finished:
            raise RuntimeError(f"{message['type']!r} sent after the response was complete")
        if message["type"] != "http.response.body":
            raise RuntimeError(f"expected 'http.response.body', got {message['type']!r}")
        body: bytes = message.get("body", b"")
        more_body: bool = message.get("more_body", False)
        transport = connection.transport
        head = self.head
        self.head = None
        if self.head_only:
            if head is not None:
                transport.write(head)
        elif self.chunked:
            parts = [b"%x\r\n" % len(body), body, CRLF] if body else []
            if not more_body:
                parts.append(LAST_CHUNK)
            if head is not None:
                parts.insert(0, head)
            if parts:
                transport.writelines(parts)
        else:
            if not self.delimited_by_close:
                self.remaining -= len(body)
                if self.remaining < 0:
                    raise RuntimeError("response body longer than its Content-Length")
            if head is not None:
                if body:
                    transport.writelines((head, body))
                else:
                    transport.write(head)
            elif body:
                transport.write(body)
        if not more_body:
            if self.remaining > 0 and not (self.chunked or self.head_only or self.delimited_by_close):
                raise RuntimeError("response body shorter than its Content-Length")
            self.finished = True
            self.wake()
            connection.response_done(self)

    def start_response(self, status: int, headers: Any) -> None:
        self.started = True
        self.status = status
        self.continue_sent = True
        parts = [STATUS_LINES[status]]
        length = -1
        for name, value in headers:
            parts += (name, HEADER_SEPARATOR, value, CRLF)
            if name == b"content-length":
                length = int(value)
        method = self.scope["method"]
        if method == "HEAD" or status in (204, 304) or status < 200:
            self.head_only = True
        elif length >= 0:
            self.remaining = length
        elif self.scope["http_version"] == "1.1":
            self.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            # An HTTP/1.0 client knows no chunks: the body ends with the connection.
            self.delimited_by_close = True
            self.keep_alive = False
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(CRLF)
        self.head = b"".join(parts)
        if self.remaining <= 0:
            # No body announced, or an unknown length (a stream, whose head must not wait for its
            # first chunk): the head goes at the end of this step unless a body message takes it.
            # With a Content-Length, the head waits for the body it announces.
            self.connection.loop.call_soon(self.flush_head)

    def flush_head(self) -> None:
        """The app started its response but sent no body within the same step: the head goes alone."""
        head = self.head
        if head is not None and not self.disconnected:
            self.head = None
            self.connection.transport.write(head)
