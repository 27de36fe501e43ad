"""Type-checked by mypy --strict (pyproject's mypy files): SPEC §1's example must pass it.

Not a test module; it only has to type-check. A ``**options: Any`` signature once failed here.
"""

from starlette.applications import Starlette

from relay_idem import IdempotencyMiddleware, RedisStore, header_scope

app = Starlette()
app.add_middleware(IdempotencyMiddleware, store=RedisStore.from_url("redis://localhost:6379/0"))
app.add_middleware(
    IdempotencyMiddleware,
    ttl=60,
    on_conflict="wait",
    require_key=["/v1/messages*"],
    scope=header_scope("X-Api-Key"),
)
