"""Running the app for a claimed key, and storing its outcome (SPEC §3.2, §3.6; retries §3.8: pending.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from starlette.types import Message

from relay_idem.exceptions import StoreUnavailable
from relay_idem.headers import end_to_end
from relay_idem.keys import key_hint
from relay_idem.lease import Lease
from relay_idem.metrics import OUTCOME, STORE_TIME
from relay_idem.pending import PendingWrite, completion_counted
from relay_idem.problems import APP_ERROR, problem_body, problem_headers
from relay_idem.store.base import Claim, Record, StoredResponse

if TYPE_CHECKING:
    from relay_idem.middleware import IdempotencyMiddleware, KeyedRequest

logger = logging.getLogger(__name__)

# ASGI extensions that would let the app send a response we cannot copy.
UNCOPYABLE_EXTENSIONS = ("http.response.pathsend", "http.response.zerocopysend")


class Execution:
    """One run of the app for a key we hold: copies the response, renews the lease, stores the outcome.

    The outcome is written (or the key released) before the last response message goes out, so a
    client that has seen the whole response and repeats at once is never told "in progress".
    That write and the last message go out from a task of their own, and the app's ``send`` returns
    at once: awaiting the store deep inside the app's send chain cost about 25 µs of CPU per
    request (benchmarks/RESULTS.md), and work the app does after its last ``send`` (Starlette's
    background tasks) never waited for our write anyway.
    """

    def __init__(self, middleware: IdempotencyMiddleware, request: KeyedRequest, claim: Claim) -> None:
        assert claim.token is not None
        self.middleware = middleware
        self.config = request.config
        self.store = middleware.store
        self.request = request
        self.token = claim.token
        self.record = claim.record
        self.start: Message | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.oversized = False
        self.client_gone = False
        self.lease = Lease(middleware.store, request.store_key, claim.token, self.config.lock_ttl, self.key_hint)
        self.last_message: asyncio.Future[None] | None = None
        # What the app sees as scope["extensions"]["idempotency"]. An app that knows its response
        # means "not processed" (the proxy, when its upstream could not be connected to) sets
        # "processed" to False before responding: the key is then released whatever the status.
        self.claim_extension: dict[str, object] = {
            "key": request.key,
            "scope": request.tenant,
            "token": claim.token,
            "processed": True,
        }

    def app_scope(self) -> dict[str, object]:
        scope = self.request.scope
        extensions = {
            name: value for name, value in (scope.get("extensions") or {}).items() if name not in UNCOPYABLE_EXTENSIONS
        }
        extensions["idempotency"] = self.claim_extension
        return {**scope, "extensions": extensions}

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.lease.start(self.loop)
        try:
            await self.middleware.app(self.app_scope(), self.request.receive_replayed(), self.send_recording)
        except BaseException:
            await self.finish_after_failure("raised an exception")
            raise
        finally:
            self.lease.stop()
        if self.last_message is not None:
            await self.last_message
        else:
            await self.finish_after_failure("returned without finishing its response")

    async def send_recording(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            self.copy(message.get("body", b""))
            if not message.get("more_body", False):
                self.last_message = self.loop.create_task(self.finish_then_send(message))
                return
        await self.forward(message)

    async def finish_then_send(self, message: Message) -> None:
        await self.finish()
        await self.forward(message)

    async def forward(self, message: Message) -> None:
        """Send to the client; a client that went away does not stop the app, nor the record."""
        if self.client_gone:
            return
        try:
            await self.request.send(message)
        except OSError:
            self.client_gone = True

    def copy(self, chunk: bytes) -> None:
        if self.oversized:
            return
        self.size += len(chunk)
        if self.size > self.config.max_response_bytes:
            self.oversized = True
            self.chunks.clear()
        elif chunk:
            self.chunks.append(chunk)

    @property
    def key_hint(self) -> str:
        return key_hint(self.request.key)

    async def finish(self) -> None:
        assert self.start is not None
        self.lease.stop()
        status: int = self.start["status"]
        if self.claim_extension["processed"] is False or not self.config.final_status(status):
            await self.release()
            return
        headers = tuple(end_to_end(self.start.get("headers", ())))
        excluded = self.request.policy.excluded
        if excluded:  # replay_exclude_headers: not stored, so never replayed
            headers = tuple((name, value) for name, value in headers if name.lower() not in excluded)
        if self.oversized:
            logger.warning(
                "relay-idem: response of %d+ bytes over max_response_bytes; stored without its body (key %s…)",
                self.size,
                self.key_hint,
            )
            response = StoredResponse(status, headers, b"", body_omitted=True)
        else:
            response = StoredResponse(status, headers, b"".join(self.chunks))
        await self.complete(response)

    async def finish_after_failure(self, what: str) -> None:
        """The app failed before finishing: the outcome is unknown, so it is final (SPEC §3.6)."""
        if self.last_message is not None:
            await self.last_message  # it finished first: its response goes out whole, then we re-raise
            return
        self.lease.stop()
        logger.warning("relay-idem: the app %s; the key's outcome is stored as a 500 (key %s…)", what, self.key_hint)
        if self.start is not None:
            # Part of a response already went out: record that it broke, without a body.
            await self.complete(StoredResponse(500, (), b"", body_omitted=True))
            return
        body = problem_body(APP_ERROR, "the application failed while processing this request")
        response = StoredResponse(500, tuple(problem_headers(body)), body)
        await self.complete(response)
        await self.forward({"type": "http.response.start", "status": 500, "headers": list(response.headers)})
        await self.forward({"type": "http.response.body", "body": body})

    async def complete(self, response: StoredResponse) -> None:
        record = Record(self.record.fingerprint, self.record.created_at, response)
        started = time.perf_counter()
        try:
            stored = await self.store.complete(self.request.store_key, self.token, record, self.config.ttl)
        except StoreUnavailable as exc:
            self.retry_later(record, exc)
            return
        STORE_TIME["complete"].observe(time.perf_counter() - started)
        completion_counted(stored, self.lease.key_hint)  # the property would slice the key on every request

    async def release(self) -> None:
        OUTCOME["not_stored"].inc()
        started = time.perf_counter()
        try:
            await self.store.release(self.request.store_key, self.token)
        except StoreUnavailable as exc:
            self.retry_later(None, exc)
            return
        STORE_TIME["release"].observe(time.perf_counter() - started)

    def retry_later(self, record: Record | None, error: StoreUnavailable) -> None:
        """The store failed to take the outcome (or the release): keep it and retry it (SPEC §3.8).

        Our caller sends the last response message at once, without waiting for the retries.
        """
        write = PendingWrite(
            self.store,
            self.request.store_key,
            self.token,
            record,
            config=self.config,
            leased_at=self.lease.confirmed_at,
            key_hint=self.key_hint,
            error=error,
        )
        self.middleware.pending.add(write)
