"""IdempotencyMiddleware: the first request with a key executes once; every repeat gets its response."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay_idem import tracing
from relay_idem.body import BodyTooLarge, declared_length, read_body
from relay_idem.exceptions import ClientDisconnected, StoreUnavailable
from relay_idem.execution import Execution
from relay_idem.fingerprint import request_fingerprint
from relay_idem.keys import InvalidKey, json_key, parse_key, record_key
from relay_idem.lease import wait_for_outcome
from relay_idem.metrics import OUTCOME, STORE_TIME
from relay_idem.options import (
    ConflictPolicy,
    FingerprintMode,
    IdempotencyConfig,
    MismatchPolicy,
    StoreErrorPolicy,
)
from relay_idem.pending import PendingWrites, drain_pending_writes
from relay_idem.problems import (
    DUPLICATE_KEY_HEADER,
    INVALID_KEY,
    KEY_IN_PROGRESS,
    KEY_REQUIRED,
    KEY_REUSED,
    REQUEST_TOO_LARGE,
    STORE_UNAVAILABLE,
    send_problem,
)
from relay_idem.routes import OPTION_NAMES, Policy, Route, RoutePolicy, route_policy
from relay_idem.scopes import ScopeFunction
from relay_idem.store.base import Claim, Store, StoredResponse
from relay_idem.store.memory import MemoryStore

logger = logging.getLogger(__name__)

# Seconds a client is told to wait before repeating a request that is still in progress, or after
# the store failed.
RETRY_AFTER = 1


def replay_headers(response: StoredResponse, excluded: Collection[bytes] = ()) -> list[tuple[bytes, bytes]]:
    """The stored headers in their order, marked as a replay (SPEC §3.3, §6a for tombstones).

    ``excluded`` (``replay_exclude_headers``) are not stored in the first place; they are dropped
    here too, from records stored before they were excluded.
    """
    headers = response.headers
    if excluded:
        headers = tuple((name, value) for name, value in headers if name not in excluded)
    if not response.body_omitted:
        return [*headers, (b"idempotent-replayed", b"true")]
    kept = [(name, value) for name, value in headers if name != b"content-length"]
    return [*kept, (b"content-length", b"0"), (b"idempotent-replayed", b"true"), (b"idempotent-body-omitted", b"true")]


async def send_replay(send: Send, response: StoredResponse, excluded: Collection[bytes] = ()) -> None:
    headers = replay_headers(response, excluded)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


class IdempotencyMiddleware:
    """Enforces the ``Idempotency-Key`` header on an ASGI app (pure ASGI, no ``BaseHTTPMiddleware``).

    ``store=None`` means a fresh :class:`~relay_idem.MemoryStore`. Options are the fields of
    :class:`~relay_idem.IdempotencyConfig`; keyword options override ``config``. They are spelled
    out rather than taken as ``**options`` so that ``app.add_middleware(IdempotencyMiddleware, …)``
    type-checks: mypy cannot match ``**kwargs: Any`` against Starlette's middleware ParamSpec.
    """

    def __init__(
        self,
        app: ASGIApp,
        store: Store | None = None,
        config: IdempotencyConfig | None = None,
        *,
        header_name: str | None = None,
        methods: Collection[str] | None = None,
        require_key: Collection[str] | None = None,
        ttl: float | None = None,
        lock_ttl: float | None = None,
        on_conflict: ConflictPolicy | None = None,
        wait_timeout: float | None = None,
        on_mismatch: MismatchPolicy | None = None,
        fingerprint: FingerprintMode | None = None,
        fingerprint_headers: Collection[str] | None = None,
        scope: ScopeFunction | None = None,
        max_waiters: int | None = None,
        final_status: Callable[[int], bool] | None = None,
        max_request_bytes: int | None = None,
        max_response_bytes: int | None = None,
        on_store_error: StoreErrorPolicy | None = None,
        complete_retry: float | None = None,
        routes: Collection[RoutePolicy] | None = None,
        key: str | None = None,
        replay_exclude_headers: Collection[str] | None = None,
    ) -> None:
        given = {name: value for name, value in locals().items() if name in OPTION_NAMES and value is not None}
        config = config or IdempotencyConfig()
        self.app = app
        self.store: Store = store if store is not None else MemoryStore()
        self.config = dataclasses.replace(config, **given) if given else config
        # The middleware's own options, for requests no route matches.
        self.policy = Policy.build(self.config)
        self.routes = tuple(Route.build(self.config, route) for route in self.config.routes)
        # Routes, or a key in the body, take the general path; otherwise a request without a key
        # costs one set lookup and one scan of its headers.
        self.routed = bool(self.routes) or self.policy.source.header is None
        self.methods = self.policy.methods.union(*(route.methods for route in self.routes))
        self.header = self.policy.source.header
        self.required_paths = self.policy.required_paths
        self.waiting = 0  # repeats of this process waiting in on_conflict="wait" mode
        self.pending = PendingWrites()  # outcome writes the store failed to take, being retried
        tracing.refresh()  # an app that set its tracer provider before building the middleware

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            if scope["type"] == "lifespan":
                receive = self.receive_draining(receive)
            await self.app(scope, receive, send)
            return
        if self.routed:
            await self.call_routed(scope, receive, send)
            return
        # A request without a key: one scan for the key's name, one count, the app (no helper, so no
        # extra frame under every request). Measured in benchmarks/README.md, "the hot path".
        header = self.header
        for name, _ in scope["headers"]:
            if name == header:
                await self.call_keyed(self.policy, scope, receive, send)
                return
        if self.required_paths is not None and self.required_paths(scope["path"]):
            await self.reject_keyless(self.policy, scope, send)
            return
        OUTCOME["bypass"].inc()
        await self.app(scope, receive, send)

    async def call_routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request under routes or a JSON key source: its policy first, then its key."""
        policy = route_policy(self.routes, self.policy, scope["method"], scope["path"]) if self.routes else self.policy
        if policy is None:
            await self.app(scope, receive, send)
            return
        if policy.source.header is None:
            await self.call_json_keyed(policy, scope, receive, send)
            return
        header = policy.source.header
        for name, _ in scope["headers"]:
            if name == header:
                await self.call_keyed(policy, scope, receive, send)
                return
        if policy.required_paths is not None and policy.required_paths(scope["path"]):
            await self.reject_keyless(policy, scope, send)
            return
        OUTCOME["bypass"].inc()
        await self.app(scope, receive, send)

    async def call_keyless(self, policy: Policy, scope: Scope, receive: Receive, send: Send) -> None:
        if policy.key_required(scope["path"]):
            await self.reject_keyless(policy, scope, send)
            return
        OUTCOME["bypass"].inc()
        await self.app(scope, receive, send)

    async def reject_keyless(self, policy: Policy, scope: Scope, send: Send) -> None:
        OUTCOME["invalid"].inc()
        detail = f"{scope['method']} {scope['path']} requires a key ({policy.source.label})"
        await send_problem(send, KEY_REQUIRED, detail)

    async def call_keyed(self, policy: Policy, scope: Scope, receive: Receive, send: Send) -> None:
        """A request with a key header: check it, read the body, then claim the key."""
        header = policy.source.header
        key_headers: list[bytes] = []
        content_length: bytes | None = None
        for name, value in scope["headers"]:
            if name == header:
                key_headers.append(value)
            elif name == b"content-length":
                content_length = value
        if len(key_headers) > 1:
            OUTCOME["invalid"].inc()
            await send_problem(send, DUPLICATE_KEY_HEADER, f"send exactly one {policy.source.label} header")
            return
        try:
            key = parse_key(key_headers[0])
        except InvalidKey as exc:
            OUTCOME["invalid"].inc()
            await send_problem(send, INVALID_KEY, f"{policy.source.label}: {exc}")
            return
        config = policy.config
        try:
            body = await read_body(
                receive, limit=config.max_request_bytes, content_length=declared_length(content_length)
            )
        except BodyTooLarge:
            OUTCOME["invalid"].inc()
            limit = config.max_request_bytes
            await send_problem(send, REQUEST_TOO_LARGE, f"a keyed request body may be at most {limit} bytes")
            return
        except ClientDisconnected:
            return
        await self.handle(self.keyed_request(policy, scope, receive, send, body, key))

    async def call_json_keyed(self, policy: Policy, scope: Scope, receive: Receive, send: Send) -> None:
        """A request whose key is a field of its JSON body (SPEC §8.2): read the body, then look."""
        content_length = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        try:
            body = await read_body(
                receive, limit=policy.config.max_request_bytes, content_length=declared_length(content_length)
            )
        except BodyTooLarge as exc:  # too large to hold a key: "no key", and the app gets all of it
            resumed = receive_read(exc.read, receive, more_body=exc.more_body) if exc.read else receive
            await self.call_keyless(policy, scope, resumed, send)
            return
        except ClientDisconnected:
            return
        else:
            try:
                key = json_key(body, policy.source.json_path)
            except InvalidKey as exc:
                OUTCOME["invalid"].inc()
                await send_problem(send, INVALID_KEY, f"{policy.source.label}: {exc}")
                return
        if key is None:
            await self.call_keyless(policy, scope, receive_read(body, receive), send)
            return
        await self.handle(self.keyed_request(policy, scope, receive, send, body, key))

    def keyed_request(
        self, policy: Policy, scope: Scope, receive: Receive, send: Send, body: bytes, key: str
    ) -> KeyedRequest:
        config = policy.config
        tenant = config.scope(scope)
        return KeyedRequest(
            scope=scope,
            receive=receive,
            send=send,
            body=body,
            key=key,
            tenant=tenant,
            store_key=record_key(self.store.prefix, tenant, key),
            fingerprint=request_fingerprint(scope, body, mode=config.fingerprint, headers=policy.fingerprint_headers),
            policy=policy,
        )

    async def drain(self) -> None:
        """Wait for the outcome writes still being retried (SPEC §3.8); each ends within ``complete_retry``.

        The middleware calls it itself when the server sends the ASGI lifespan shutdown, before the
        app's own shutdown runs; call it yourself where no lifespan reaches the middleware.
        """
        await self.pending.drain()

    @staticmethod
    async def drain_all() -> None:
        """:meth:`drain` for every ``IdempotencyMiddleware`` and every ``@idempotent`` function of this process.

        For frameworks that build the middleware themselves and keep the lifespan from it (Litestar:
        ``Litestar(..., on_shutdown=[IdempotencyMiddleware.drain_all])``).
        """
        await drain_pending_writes()

    def receive_draining(self, receive: Receive) -> Receive:
        """The lifespan channel, holding ``lifespan.shutdown`` back until the pending writes are done."""

        async def receive_after_drain() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.drain()
            return message

        return receive_after_drain

    async def begin(self, request: KeyedRequest) -> Claim:
        started = time.perf_counter()
        claim = await self.store.begin(request.store_key, request.fingerprint, request.config.lock_ttl)
        STORE_TIME["begin"].observe(time.perf_counter() - started)
        return claim

    async def handle(self, request: KeyedRequest) -> None:
        tracing.keyed_request(request.key)
        looked_at = time.monotonic()
        try:
            claim = await self.begin(request)
            if not claim.acquired and claim.record.response is None and request.config.on_conflict == "wait":
                if self.record_mismatch(claim, request):
                    await self.reject_mismatch(request)
                    return
                waited = await self.wait_for_outcome(request, claim, looked_at)
                if waited is None:
                    return  # the client went away while it waited: nobody to answer
                claim = waited
        except StoreUnavailable as exc:
            await self.store_failed(request, exc)
            return
        if claim.acquired:
            await Execution(self, request, claim).run()
        elif self.record_mismatch(claim, request):
            await self.reject_mismatch(request)
        elif claim.record.response is not None:
            OUTCOME["replayed"].inc()
            await send_replay(request.send, claim.record.response, request.policy.excluded)
        else:
            OUTCOME["conflict"].inc()
            await send_problem(
                request.send,
                KEY_IN_PROGRESS,
                "a request with this key is still being processed; retry later",
                retry_after=RETRY_AFTER,
            )

    def record_mismatch(self, claim: Claim, request: KeyedRequest) -> bool:
        return claim.record.fingerprint != request.fingerprint and request.config.on_mismatch == "reject"

    async def reject_mismatch(self, request: KeyedRequest) -> None:
        OUTCOME["mismatch"].inc()
        await send_problem(
            request.send, KEY_REUSED, "this key was first used with a different request (method, path or body)"
        )

    async def wait_for_outcome(self, request: KeyedRequest, claim: Claim, looked_at: float) -> Claim | None:
        """Wait for the first request to finish: its completion, its release (we take over) or the timeout.

        Returns the last claim seen (one still in progress means the wait timed out), or None if the
        client disconnected meanwhile: its ``max_waiters`` slot is freed at once, not when the first
        request finishes or ``wait_timeout`` ends (issue 12).
        """
        if self.waiting >= request.config.max_waiters:
            return claim
        self.waiting += 1
        gone = asyncio.ensure_future(wait_for_disconnect(request.receive))
        try:
            timeout = request.config.wait_timeout
            begin = functools.partial(self.begin, request)
            return await wait_for_outcome(self.store, request.store_key, claim, looked_at, timeout, begin, gone)
        finally:
            self.waiting -= 1
            # The body was read whole, so the only message left is the disconnect: a waiter that
            # takes the key over hands its app a receive() of its own.
            gone.cancel()
            if gone.done() and not gone.cancelled():
                gone.exception()  # retrieved, so that a receive() that raised is not logged as lost

    async def store_failed(self, request: KeyedRequest, exc: StoreUnavailable) -> None:
        OUTCOME["store_error"].inc()
        logger.warning(
            "relay-idem: store unavailable before the claim (%s); on_store_error=%s", exc, request.config.on_store_error
        )
        if request.config.on_store_error == "open":
            await self.app(request.scope, request.receive_replayed(), request.send)
            return
        await send_problem(
            request.send,
            STORE_UNAVAILABLE,
            "the idempotency store did not answer; the request was not processed",
            retry_after=RETRY_AFTER,
        )


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns once the client has gone (read after the whole body, so nothing else is lost)."""
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclasses.dataclass(slots=True)
class KeyedRequest:
    """One request that carries a valid key, with its body already read."""

    scope: Scope
    receive: Receive
    send: Send
    body: bytes
    key: str
    tenant: str
    store_key: str
    fingerprint: bytes
    policy: Policy

    @property
    def config(self) -> IdempotencyConfig:
        return self.policy.config

    def receive_replayed(self) -> Receive:
        """A ``receive`` that hands the app the buffered body, then the real channel (for disconnects)."""
        return receive_read(self.body, self.receive)


def receive_read(body: bytes, receive: Receive, *, more_body: bool = False) -> Receive:
    """A ``receive`` that hands the app ``body``, already read, then the real channel.

    ``more_body``: the body goes on in ``receive`` (a body read in part); else the real channel only
    carries a disconnect.
    """
    body_replayed = False

    async def receive_replayed() -> Message:
        nonlocal body_replayed
        if body_replayed:
            return await receive()
        body_replayed = True
        return {"type": "http.request", "body": body, "more_body": more_body}

    return receive_replayed
