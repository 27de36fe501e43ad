"""RFC 9457 problem+json responses for every error relay-idem produces itself (SPEC §3.7).

Each situation has its own ``type``: a ``tag:`` URI (RFC 4151), which RFC 9457 §3.1.1 suggests
for types that are not meant to be dereferenced. This project owns no domain its types could
resolve under; the README's "Problem types" table says what each one means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.types import Send

TYPE_BASE = "tag:relay-idem,2026:problems/"


@dataclass(frozen=True, slots=True)
class Problem:
    """One situation relay-idem answers for itself; ``type`` tells a client it from the app's own errors."""

    slug: str
    status: int
    title: str

    @property
    def type(self) -> str:
        return TYPE_BASE + self.slug


INVALID_KEY = Problem("invalid-key", 400, "Invalid Idempotency-Key")
DUPLICATE_KEY_HEADER = Problem("duplicate-key-header", 400, "More than one Idempotency-Key")
KEY_REQUIRED = Problem("key-required", 400, "Idempotency-Key required")
REQUEST_TOO_LARGE = Problem("request-too-large", 413, "Request body too large")
KEY_IN_PROGRESS = Problem("key-in-progress", 409, "Request with this Idempotency-Key in progress")
KEY_REUSED = Problem("key-reused", 422, "Idempotency-Key reused for a different request")
STORE_UNAVAILABLE = Problem("store-unavailable", 503, "Idempotency store unavailable")
APP_ERROR = Problem("app-error", 500, "The application failed")
UPSTREAM_UNREACHABLE = Problem("upstream-unreachable", 502, "Upstream could not be reached")
UPSTREAM_FAILED = Problem("upstream-failed", 502, "Upstream failed after the request was sent")
UPSTREAM_TIMEOUT = Problem("upstream-timeout", 504, "Upstream timed out")
# The proxy's front refuses these before any request reaches the middleware (SPEC §4, hostile clients).
MALFORMED_REQUEST = Problem("malformed-request", 400, "Malformed HTTP request")
HEADER_TOO_LARGE = Problem("header-too-large", 431, "Request header too large")
REQUEST_TIMEOUT = Problem("request-timeout", 408, "Request body timed out")
TOO_MANY_CONNECTIONS = Problem("too-many-connections", 503, "Too many connections")

CONTENT_TYPE = b"application/problem+json"


def problem_body(problem: Problem, detail: str) -> bytes:
    document = {"type": problem.type, "title": problem.title, "status": problem.status, "detail": detail}
    return json.dumps(document).encode()


def problem_headers(body: bytes, retry_after: int | None = None) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", CONTENT_TYPE), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, retry_after)).encode()))
    return headers


async def send_problem(send: Send, problem: Problem, detail: str, *, retry_after: int | None = None) -> None:
    """Send ``problem`` as a whole response. ``Retry-After`` is whole seconds, at least 1."""
    body = problem_body(problem, detail)
    await send({"type": "http.response.start", "status": problem.status, "headers": problem_headers(body, retry_after)})
    await send({"type": "http.response.body", "body": body})
