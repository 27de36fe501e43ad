"""The message API behind ``fastapi-idempotency`` (PyPI).

It ships no Redis store (only ``MemoryStore`` and a Tortoise-ORM store), so it runs with
its in-process ``MemoryStore``: correct only with one worker (the ``storm-w2`` scenario runs two,
to show the duplicate executions that follow).
Requests without a key are *not* passed through: it derives an automatic key from the
request fingerprint and replays identical requests for 10 s (``automatic_window``).
"""

from __future__ import annotations

from fastapi_idempotency import IdempotencyMiddleware, MemoryStore
from starlette.middleware import Middleware

from benchmarks.apps.common import create_app

app = create_app([Middleware(IdempotencyMiddleware, store=MemoryStore())])
