"""The middleware's options, as one frozen value shared by the middleware, the proxy and the CLI."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from relay_idem.keys import KeySource
from relay_idem.scopes import ScopeFunction, authorization_scope

if TYPE_CHECKING:
    from relay_idem.routes import RoutePolicy

ConflictPolicy = Literal["reject", "wait"]
MismatchPolicy = Literal["reject", "replay"]
FingerprintMode = Literal["raw", "json"]
StoreErrorPolicy = Literal["closed", "open"]

# HTTP's "not processed, try again" statuses: a key that ends in one of these is released.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 503})


def default_final_status(status: int) -> bool:
    """Whether ``status`` is the key's final outcome: everything but 408, 425, 429 and 503."""
    return status not in RETRYABLE_STATUSES


def _check_choice(name: str, value: str, choices: Collection[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(sorted(choices))}, not {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, not {value!r}")


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    """Every option of :class:`~relay_idem.IdempotencyMiddleware`; see SPEC §1 for their meaning."""

    header_name: str = "Idempotency-Key"
    methods: Collection[str] = ("POST", "PATCH")
    require_key: Collection[str] = ()
    ttl: float = 86_400.0
    lock_ttl: float = 10.0
    on_conflict: ConflictPolicy = "reject"
    wait_timeout: float = 10.0
    on_mismatch: MismatchPolicy = "reject"
    fingerprint: FingerprintMode = "raw"
    fingerprint_headers: Collection[str] = ()
    scope: ScopeFunction = field(default=authorization_scope)
    max_waiters: int = 1000
    final_status: Callable[[int], bool] = field(default=default_final_status)
    max_request_bytes: int = 1024 * 1024
    max_response_bytes: int = 1024 * 1024
    on_store_error: StoreErrorPolicy = "closed"
    complete_retry: float = 30.0
    routes: Collection[RoutePolicy] = ()
    key: str | None = None
    replay_exclude_headers: Collection[str] = ()

    def __post_init__(self) -> None:
        if not self.header_name or not self.header_name.isascii():
            raise ValueError(f"header_name must be a non-empty ASCII header name, not {self.header_name!r}")
        for name in ("methods", "require_key", "fingerprint_headers", "replay_exclude_headers", "routes"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"{name} takes a collection, not one string")
        if self.key is not None:
            KeySource.parse(self.key)
        _check_choice("on_conflict", self.on_conflict, ("reject", "wait"))
        _check_choice("on_mismatch", self.on_mismatch, ("reject", "replay"))
        _check_choice("fingerprint", self.fingerprint, ("raw", "json"))
        _check_choice("on_store_error", self.on_store_error, ("closed", "open"))
        for name in ("ttl", "lock_ttl", "wait_timeout"):
            _check_positive(name, getattr(self, name))
        for name in ("max_waiters", "max_request_bytes", "max_response_bytes", "complete_retry"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)!r}")

    @property
    def key_source(self) -> KeySource:
        """Where the key comes from: the ``key`` option, or the ``header_name`` header."""
        return KeySource.parse(self.key if self.key is not None else f"header:{self.header_name}")
