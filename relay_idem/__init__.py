"""relay-idem: the first request with an ``Idempotency-Key`` executes once; every repeat gets its response back."""

from relay_idem.exceptions import KeyInProgress, KeyReused, StoreUnavailable
from relay_idem.functions import idempotent
from relay_idem.middleware import IdempotencyMiddleware
from relay_idem.options import IdempotencyConfig, default_final_status
from relay_idem.pending import drain_pending_writes
from relay_idem.routes import RoutePolicy
from relay_idem.scopes import authorization_scope, header_scope
from relay_idem.store import MemoryStore, RedisStore, Store

__version__ = "0.1.0"

__all__ = [
    "IdempotencyConfig",
    "IdempotencyMiddleware",
    "KeyInProgress",
    "KeyReused",
    "MemoryStore",
    "RedisStore",
    "RoutePolicy",
    "Store",
    "StoreUnavailable",
    "__version__",
    "authorization_scope",
    "default_final_status",
    "drain_pending_writes",
    "header_scope",
    "idempotent",
]
