"""One Redis connection per process, shared by every task: commands are pipelined as they come.

The store's hot path (benchmarks/clients/measure_clients.py measured it: ~6 µs of CPU per call
against ~70 µs for redis-py's pooled client, whose per-call machinery costs as much as a whole
request of a small app). Each call packs its command with ``hiredis.pack_command`` and queues
it; the commands queued in one turn of the event loop go out in one write, without waiting for
earlier replies; ``data_received`` feeds a ``hiredis.Reader`` and hands each reply to the
oldest waiting future. Redis answers a connection's commands in order, so a
deque of futures is all the bookkeeping needed.

What it handles, and how:

- ``NOSCRIPT``: scripts registered with :meth:`MultiplexedRedis.register_script` are
  reloaded when ``EVALSHA`` reports them missing (after a restart or ``SCRIPT FLUSH``).
  ``SCRIPT LOAD`` and the retried ``EVALSHA`` go out back to back on the same connection,
  so the retry costs one round trip, not two.
- Connection loss: every pending call fails with :class:`ConnectionError`; the next call
  reconnects (one attempt shared by all callers, bounded by ``connect_timeout``).
- Timeouts: a call not answered within ``timeout`` raises :class:`TimeoutError`. Replies
  come back in order, so only the oldest pending call can be the first to be late, and a
  late reply means everything queued behind it is late too. One timer per connection
  therefore watches the oldest call (a timer per call cost ~2 µs, a quarter of the whole
  call); when it expires the connection is dropped, the calls behind it get
  :class:`ConnectionError`, and the next call reconnects, as redis-py does after a
  socket timeout.
- Cancellation: a cancelled caller leaves its future in the queue; its reply is read and
  dropped when it arrives, so replies never shift onto the wrong caller.

- Where to connect: a fixed host/port or Unix socket, or an ``address`` coroutine asked again
  before every connection (Sentinel names the current primary that way; the store's primary
  watcher calls :meth:`MultiplexedRedis.reset` when :attr:`~MultiplexedRedis.peer` is no longer it).

Left to redis-py, which :class:`~relay_idem.store.redis_store.RedisStore` keeps beside this
connection: TLS, Cluster slot routing, pub/sub, and anything blocking (it would stall every
call queued behind it on the shared connection).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import hiredis

__all__ = ["MultiplexedRedis", "ResponseError"]

Arg = str | bytes | int | float
_pack = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)  # its stub only takes a 1-tuple

_EVALSHA: Final = frozenset({"EVALSHA", b"EVALSHA", "EVALSHA_RO", b"EVALSHA_RO"})
_NO_DEADLINE: Final = float("inf")


class ResponseError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""


class _RedisProtocol(asyncio.Protocol):
    """Writes packed commands and resolves one future per reply, in order."""

    def __init__(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()  # (future, deadline)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self._unsent: list[bytes] = []
        self.is_closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.is_closed or self._transport is None:
            raise ConnectionError("Redis connection is closed")
        future = self._loop.create_future()
        if self._timeout is None:
            self._pending.append((future, _NO_DEADLINE))
        else:
            deadline = self._loop.time() + self._timeout
            self._pending.append((future, deadline))
            if self._watchdog is None:
                self._watchdog = self._loop.call_at(deadline, self._check_oldest)
        if not self._unsent:
            self._loop.call_soon(self._flush)
        self._unsent.append(command)
        return future

    def _flush(self) -> None:
        """One write for every command queued in this turn of the event loop: one syscall, not one each."""
        unsent, self._unsent = self._unsent, []
        if self._transport is not None and not self.is_closed:
            self._transport.write(b"".join(unsent))

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        pending = self._pending
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                future = pending.popleft()[0]
                if future.done():  # its caller was cancelled: drop the reply, keep the order
                    continue
                if isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self.abort(f"Redis protocol error: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_pending("Connection to Redis lost" + (f": {exc}" if exc else ""))

    def abort(self, reason: str) -> None:
        """Drop the connection and fail every pending call with ``ConnectionError(reason)``."""
        self._fail_pending(reason)
        if self._transport is not None:
            self._transport.abort()

    def _check_oldest(self) -> None:
        self._watchdog = None
        if not self._pending or self.is_closed:
            return
        future, deadline = self._pending[0]
        if deadline > self._loop.time():  # the late one was answered: watch the new oldest
            self._watchdog = self._loop.call_at(deadline, self._check_oldest)
            return
        if not future.done():
            future.set_exception(TimeoutError(f"Redis did not answer within {self._timeout} s"))
        self.abort(f"Dropped the Redis connection after a call timed out ({self._timeout} s)")

    def _fail_pending(self, reason: str) -> None:
        self.is_closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._pending:
            future = self._pending.popleft()[0]
            if not future.done():
                future.set_exception(ConnectionError(reason))


class MultiplexedRedis:
    """A Redis client that pipelines every task's commands over one connection.

    ``timeout`` bounds each call (``None``: no bound); ``connect_timeout`` bounds each
    connection attempt, handshake included. Give either ``host``/``port`` or ``path``
    (a Unix socket).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        path: str | None = None,
        address: Callable[[], Awaitable[tuple[str, int]]] | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout: float | None = 0.5,
        connect_timeout: float = 1.0,
    ) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.address = address
        self.db = db
        self.username = username
        self.password = password
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._protocol: _RedisProtocol | None = None
        self._peer: tuple[str, int] | None = None
        self._connect_lock = asyncio.Lock()
        self._scripts: dict[str, bytes] = {}

    def register_script(self, script: str | bytes) -> str:
        """Remember a Lua script so ``EVALSHA`` can reload it after ``NOSCRIPT``; return its SHA1."""
        body = script.encode() if isinstance(script, str) else script
        sha = hashlib.sha1(body).hexdigest()
        self._scripts[sha] = body
        return sha

    async def execute(self, *args: Arg) -> Any:
        """Send one command and return its reply; an error reply raises :class:`ResponseError`."""
        command = _pack(args)
        protocol = self._protocol
        if protocol is None or protocol.is_closed:
            protocol = await self._connect()
        try:
            return await protocol.send(command)
        except ResponseError as exc:
            script = self._missing_script(args, exc)
            if script is None:
                raise
        protocol = await self._connect()
        load = protocol.send(_pack(("SCRIPT", "LOAD", script)))
        retry = protocol.send(command)
        await asyncio.gather(load, retry)  # gather marks a failure of both as retrieved
        return retry.result()

    async def execute_pipelined(self, *commands: tuple[Arg, ...]) -> list[Any]:
        """Send ``commands`` back to back on one connection (a write and its ``WAIT`` must share one)."""
        protocol = self._protocol
        if protocol is None or protocol.is_closed:
            protocol = await self._connect()
        replies = await asyncio.gather(*(protocol.send(_pack(command)) for command in commands), return_exceptions=True)
        missing = [
            self._missing_script(command, reply)
            for command, reply in zip(commands, replies, strict=True)
            if isinstance(reply, ResponseError)
        ]
        if missing and all(script is not None for script in missing):
            protocol = await self._connect()
            loads = [protocol.send(_pack(("SCRIPT", "LOAD", script))) for script in set(missing) if script]
            retries = [protocol.send(_pack(command)) for command in commands]
            await asyncio.gather(*loads, *retries)
            return [retry.result() for retry in retries]
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return list(replies)

    @property
    def peer(self) -> tuple[str, int] | None:
        """The server (host, port) the open connection goes to; None when closed or on a Unix socket."""
        protocol = self._protocol
        return self._peer if protocol is not None and not protocol.is_closed else None

    def reset(self, reason: str) -> None:
        """Drop the connection (after ``READONLY``, or once Sentinel names another primary); the next call reconnects.

        Pending calls fail with :class:`ConnectionError`.
        """
        if self._protocol is not None:
            self._protocol.abort(reason)
            self._protocol = None

    async def aclose(self) -> None:
        """Close the connection; pending calls fail with :class:`ConnectionError`."""
        self.reset("Client closed")

    def _missing_script(self, args: tuple[Arg, ...], exc: ResponseError) -> bytes | None:
        if not str(exc).startswith("NOSCRIPT") or len(args) < 2 or args[0] not in _EVALSHA:
            return None
        sha = args[1].decode() if isinstance(args[1], bytes) else str(args[1])
        return self._scripts.get(sha)

    async def _connect(self) -> _RedisProtocol:
        async with self._connect_lock:  # concurrent callers share one attempt
            if self._protocol is not None and not self._protocol.is_closed:
                return self._protocol
            loop = asyncio.get_running_loop()
            timeout = self.timeout

            def factory() -> _RedisProtocol:
                return _RedisProtocol(timeout)

            async with asyncio.timeout(self.connect_timeout):
                if self.path is not None:
                    _, protocol = await loop.create_unix_connection(factory, self.path)
                else:
                    host, port = await self.address() if self.address is not None else (self.host, self.port)
                    _, protocol = await loop.create_connection(factory, host, port)
                    self._peer = (str(host), int(port))
                try:
                    await self._handshake(protocol)
                except BaseException:
                    protocol.abort("Redis handshake failed")
                    raise
            self._protocol = protocol
            return protocol

    async def _handshake(self, protocol: _RedisProtocol) -> None:
        commands: list[tuple[Arg, ...]] = []
        if self.password is not None:
            auth: tuple[Arg, ...] = (self.username, self.password) if self.username else (self.password,)
            commands.append(("AUTH", *auth))
        if self.db:
            commands.append(("SELECT", self.db))
        if commands:  # pipelined too; gather marks every failure as retrieved
            await asyncio.gather(*(protocol.send(_pack(command)) for command in commands))
