"""Tiny raw ASGI apps for the tests, and a hand-built ASGI driver for races and disconnects.

Every app counts its calls (``app.calls``) and keeps the scopes it saw (``app.scopes``), so a
test can tell a replay (the app was not called) from an execution.

    Counter()                       200 "call N"; N counts the calls
    Echo(headers=...)               200, echoes the request body after the given headers
    Slow(gate)                      answers once ``gate`` is set; ``started`` is set when it begins
    Streaming(chunks, gate=None)    sends ``chunks`` one message each; waits for ``gate`` before the last
    Raising(after_start=False)      raises RuntimeError, before or after its response has started
    Statuses(503, 200, ...)         answers call N with the Nth status (the last one repeats)
    SetCookieTwice()                two Set-Cookie headers among others, in a fixed order

``call(app, ...)`` drives any ASGI app with a hand-built scope, receive and send, and returns a
:class:`Result`; ``client(app)`` is an ``httpx.AsyncClient`` on ``httpx.ASGITransport``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

Message = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]


# Waits a test expects to end by an event (the store's notification) use LONG_WAIT as their timeout,
# so that only the event can end them before it; HANG_GUARD bounds how long the test waits for it.
LONG_WAIT = 60.0
HANG_GUARD = 10.0


async def read_request_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def respond(send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class App:
    """Base of the test apps: counts calls, keeps scopes and request bodies, then ``handle``s."""

    def __init__(self) -> None:
        self.calls = 0
        self.scopes: list[Scope] = []
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.calls += 1
        self.scopes.append(scope)
        body = await read_request_body(receive)
        self.bodies.append(body)
        await self.handle(scope, body, send)

    async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
        raise NotImplementedError

    @property
    def claim(self) -> dict[str, str]:
        """The ``extensions["idempotency"]`` of the last call."""
        claim: dict[str, str] = self.scopes[-1]["extensions"]["idempotency"]
        return claim


class Counter(App):
    """200 ``call N``, N counting this app's calls."""

    def __init__(self, status: int = 200) -> None:
        super().__init__()
        self.status = status

    async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
        await respond(send, self.status, f"call {self.calls}".encode(), [(b"content-type", b"text/plain")])


class Echo(App):
    """200 with the request body, after ``headers``."""

    def __init__(self, headers: Sequence[tuple[bytes, bytes]] = (), status: int = 200) -> None:
        super().__init__()
        self.headers = list(headers)
        self.status = status

    async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
        await respond(send, self.status, body, self.headers)


class Slow(App):
    """Answers ``call N`` once ``gate`` is set (or after ``delay`` seconds); ``started`` is set on entry."""

    def __init__(self, gate: asyncio.Event | None = None, delay: float = 0.0, status: int = 200) -> None:
        super().__init__()
        self.gate = gate
        self.delay = delay
        self.status = status
        self.started = asyncio.Event()
        self.finished_at: float | None = None

    async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        await respond(send, self.status, f"call {self.calls}".encode())
        self.finished_at = asyncio.get_running_loop().time()


class Streaming(App):
    """Sends ``chunks`` as separate body messages; waits for ``gate`` before the last one."""

    def __init__(self, chunks: Sequence[bytes], gate: asyncio.Event | None = None, status: int = 200) -> None:
        super().__init__()
        self.chunks = list(chunks)
        self.gate = gate
        self.status = status

    async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": [(b"content-type", b"x/y")]})
        for chunk in self.chunks[:-1]:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if self.gate is not None:
            await self.gate.wait()
        await send({"type": "http.response.body", "body": self.chunks[-1] if self.chunks else b""})


class AppFailed(RuntimeError):
    """What :class:`Raising` raises."""


class Raising(App):
    """Raises :class:`AppFailed`, before its response starts or after its first body chunk."""

    def __init__(self, after_start: bool = False) -> None:
        super().__init__()
        self.after_start = after_start

    async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
        if self.after_start:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise AppFailed(f"call {self.calls} failed")


class Statuses(App):
    """Answers call N with the Nth of ``statuses`` (the last repeats); waits for ``gate`` on call 1."""

    def __init__(self, *statuses: int, gate: asyncio.Event | None = None) -> None:
        super().__init__()
        self.statuses = statuses
        self.gate = gate
        self.started = asyncio.Event()

    async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
        self.started.set()
        if self.calls == 1 and self.gate is not None:
            await self.gate.wait()
        status = self.statuses[min(self.calls, len(self.statuses)) - 1]
        await respond(send, status, f"call {self.calls}: {status}".encode())


SET_COOKIE_HEADERS: RawHeaders = [
    (b"content-type", b"application/json"),
    (b"set-cookie", b"session=abc; Path=/; HttpOnly"),
    (b"x-trace", b"1"),
    (b"set-cookie", b"theme=dark; Path=/"),
    (b"x-trace", b"2"),
]


class SetCookieTwice(App):
    """Two ``Set-Cookie`` headers, and a repeated ``X-Trace``, in a fixed order."""

    async def handle(self, scope: Scope, body: bytes, send: Send) -> None:
        await respond(send, 201, json.dumps({"call": self.calls}).encode(), SET_COOKIE_HEADERS)


# --- driving an app by hand ---------------------------------------------------------------


@dataclass
class Result:
    """What a hand-driven request got back."""

    status: int | None = None
    headers: RawHeaders = field(default_factory=list)
    body: bytes = b""
    messages: list[Message] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def header(self, name: bytes) -> bytes | None:
        values = self.header_list(name)
        return values[0] if values else None

    def header_list(self, name: bytes) -> list[bytes]:
        return [value for header_name, value in self.headers if header_name == name]

    def json(self) -> Any:
        return json.loads(self.body)


def make_scope(
    method: str = "POST",
    path: str = "/",
    headers: Iterable[tuple[bytes, bytes]] = (),
    query_string: bytes = b"",
) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query_string,
        "root_path": "",
        "headers": list(headers),
        "client": ("127.0.0.1", 12345),
        "server": ("test", 80),
        "extensions": {},
    }


def idem(key: str | bytes, *more: tuple[bytes, bytes]) -> RawHeaders:
    """Request headers carrying ``key`` (and ``more``)."""
    return [(b"idempotency-key", key.encode() if isinstance(key, str) else key), *more]


async def call(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    *,
    method: str = "POST",
    path: str = "/",
    headers: Iterable[tuple[bytes, bytes]] = (),
    body: bytes | Sequence[bytes] = b"",
    query_string: bytes = b"",
    scope: Scope | None = None,
    on_send: Callable[[Message, Result], Awaitable[None]] | None = None,
) -> Result:
    """Run one request through ``app``; ``on_send`` sees every message before it is recorded.

    ``body`` as a sequence is sent as that many ``http.request`` messages. After the body, ``receive``
    blocks until the response is complete, then reports ``http.disconnect``.
    """
    result = Result()
    chunks = [body] if isinstance(body, bytes) else list(body) or [b""]
    pending = list(enumerate(chunks))

    async def receive() -> Message:
        if pending:
            index, chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        await result.done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if on_send is not None:
            await on_send(message, result)
        result.messages.append(message)
        if message["type"] == "http.response.start":
            result.status = message["status"]
            result.headers = [(bytes(name), bytes(value)) for name, value in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            result.body += message.get("body", b"")
            if not message.get("more_body", False):
                result.done.set()

    if scope is None:
        scope = make_scope(method, path, headers, query_string)
    try:
        await app(scope, receive, send)
    finally:
        result.done.set()
    return result


def client(app: Callable[[Scope, Receive, Send], Awaitable[None]], **options: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` that calls ``app`` in process."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, **options), base_url="http://test")
