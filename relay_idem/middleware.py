"""IdempotencyMiddleware: the first request with a key executes once; every repeat gets its response."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay_idem.body import BodyTooLarge, declared_length, read_body
from relay_idem.exceptions import ClientDisconnected, StoreUnavailable
from relay_idem.execution import Execution
from relay_idem.fingerprint import request_fingerprint
from relay_idem.keys import InvalidKey, parse_key, record_key
from relay_idem.metrics import OUTCOME, STORE_TIME
from relay_idem.options import (
    ConflictPolicy,
    FingerprintMode,
    IdempotencyConfig,
    MismatchPolicy,
    StoreErrorPolicy,
)
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
from relay_idem.scopes import ScopeFunction
from relay_idem.store.base import Claim, Store, StoredResponse
from relay_idem.store.memory import MemoryStore

logger = logging.getLogger(__name__)

OPTION_NAMES = frozenset(field.name for field in dataclasses.fields(IdempotencyConfig))

# Seconds a client is told to wait before repeating a request that is still in progress, or after
# the store failed.
RETRY_AFTER = 1


def replay_headers(response: StoredResponse) -> list[tuple[bytes, bytes]]:
    """The stored headers in their order, marked as a replay (SPEC §3.3, §6a for tombstones)."""
    if not response.body_omitted:
        return [*response.headers, (b"idempotent-replayed", b"true")]
    kept = [(name, value) for name, value in response.headers if name != b"content-length"]
    return [*kept, (b"content-length", b"0"), (b"idempotent-replayed", b"true"), (b"idempotent-body-omitted", b"true")]


async def send_replay(send: Send, response: StoredResponse) -> None:
    await send({"type": "http.response.start", "status": response.status, "headers": replay_headers(response)})
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
    ) -> None:
        given = {name: value for name, value in locals().items() if name in OPTION_NAMES and value is not None}
        config = config or IdempotencyConfig()
        self.app = app
        self.store: Store = store if store is not None else MemoryStore()
        self.config = dataclasses.replace(config, **given) if given else config
        self.methods = frozenset(method.upper() for method in self.config.methods)
        self.header = self.config.header_name.lower().encode("latin-1")
        self.required_paths = tuple(self.config.require_key)
        self.fingerprint_headers = tuple(name.lower().encode("latin-1") for name in self.config.fingerprint_headers)
        self.waiting = 0  # repeats of this process waiting in on_conflict="wait" mode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            await self.app(scope, receive, send)
            return
        key_headers: list[bytes] = []
        content_length: bytes | None = None
        for name, value in scope["headers"]:
            if name == self.header:
                key_headers.append(value)
            elif name == b"content-length":
                content_length = value
        if not key_headers:
            if self.required_paths and self.key_required(scope["path"]):
                OUTCOME["invalid"].inc()
                detail = f"{scope['method']} {scope['path']} requires an {self.config.header_name}"
                await send_problem(send, KEY_REQUIRED, detail)
                return
            OUTCOME["bypass"].inc()
            await self.app(scope, receive, send)  # not via a helper: no extra frame under every request
            return
        if len(key_headers) > 1:
            OUTCOME["invalid"].inc()
            await send_problem(send, DUPLICATE_KEY_HEADER, f"send exactly one {self.config.header_name} header")
            return
        try:
            key = parse_key(key_headers[0])
        except InvalidKey as exc:
            OUTCOME["invalid"].inc()
            await send_problem(send, INVALID_KEY, f"{self.config.header_name}: {exc}")
            return
        try:
            body = await read_body(
                receive,
                limit=self.config.max_request_bytes,
                content_length=declared_length(content_length),
            )
        except BodyTooLarge:
            OUTCOME["invalid"].inc()
            limit = self.config.max_request_bytes
            await send_problem(send, REQUEST_TOO_LARGE, f"a keyed request body may be at most {limit} bytes")
            return
        except ClientDisconnected:
            return
        tenant = self.config.scope(scope)
        request = KeyedRequest(
            scope=scope,
            receive=receive,
            send=send,
            body=body,
            key=key,
            tenant=tenant,
            store_key=record_key(self.store.prefix, tenant, key),
            fingerprint=request_fingerprint(
                scope, body, mode=self.config.fingerprint, headers=self.fingerprint_headers
            ),
        )
        await self.handle(request)

    def key_required(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.required_paths)

    async def begin(self, request: KeyedRequest) -> Claim:
        started = time.perf_counter()
        claim = await self.store.begin(request.store_key, request.fingerprint, self.config.lock_ttl)
        STORE_TIME["begin"].observe(time.perf_counter() - started)
        return claim

    async def handle(self, request: KeyedRequest) -> None:
        looked_at = time.monotonic()
        try:
            claim = await self.begin(request)
            if not claim.acquired and claim.record.response is None and self.config.on_conflict == "wait":
                if self.record_mismatch(claim, request):
                    await self.reject_mismatch(request)
                    return
                claim = await self.wait_for_outcome(request, claim, looked_at)
        except StoreUnavailable as exc:
            await self.store_failed(request, exc)
            return
        if claim.acquired:
            await Execution(self, request, claim).run()
        elif self.record_mismatch(claim, request):
            await self.reject_mismatch(request)
        elif claim.record.response is not None:
            OUTCOME["replayed"].inc()
            await send_replay(request.send, claim.record.response)
        else:
            OUTCOME["conflict"].inc()
            await send_problem(
                request.send,
                KEY_IN_PROGRESS,
                "a request with this key is still being processed; retry later",
                retry_after=RETRY_AFTER,
            )

    def record_mismatch(self, claim: Claim, request: KeyedRequest) -> bool:
        return claim.record.fingerprint != request.fingerprint and self.config.on_mismatch == "reject"

    async def reject_mismatch(self, request: KeyedRequest) -> None:
        OUTCOME["mismatch"].inc()
        await send_problem(
            request.send, KEY_REUSED, "this key was first used with a different request (method, path or body)"
        )

    async def wait_for_outcome(self, request: KeyedRequest, claim: Claim, looked_at: float) -> Claim:
        """Wait for the first request to finish: its completion, its release (we take over) or the timeout.

        Returns the last claim seen; one still in progress means the wait timed out.
        """
        if self.waiting >= self.config.max_waiters:
            return claim
        self.waiting += 1
        try:
            deadline = looked_at + self.config.wait_timeout
            while (remaining := deadline - time.monotonic()) > 0:
                await self.store.wait(request.store_key, looked_at, remaining)
                looked_at = time.monotonic()
                claim = await self.begin(request)
                if claim.acquired or claim.record.response is not None:
                    return claim
            return claim
        finally:
            self.waiting -= 1

    async def store_failed(self, request: KeyedRequest, exc: StoreUnavailable) -> None:
        OUTCOME["store_error"].inc()
        logger.warning(
            "relay-idem: store unavailable before the claim (%s); on_store_error=%s", exc, self.config.on_store_error
        )
        if self.config.on_store_error == "open":
            await self.app(request.scope, request.receive_replayed(), request.send)
            return
        await send_problem(
            request.send,
            STORE_UNAVAILABLE,
            "the idempotency store did not answer; the request was not processed",
            retry_after=RETRY_AFTER,
        )


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

    def receive_replayed(self) -> Receive:
        """A ``receive`` that hands the app the buffered body, then the real channel (for disconnects)."""
        body_replayed = False

        async def receive() -> Message:
            nonlocal body_replayed
            if body_replayed:
                return await self.receive()
            body_replayed = True
            return {"type": "http.request", "body": self.body, "more_body": False}

        return receive
