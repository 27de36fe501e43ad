"""Config: the proxy's settings, shared by the CLI, the proxy app, its worker processes and the tests.

One flag, one keyword, one attribute, with the same name (uvicorn's ``main() -> run() -> Config``).
A config travels to ``--workers`` processes as JSON in an environment variable.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any, Literal
from urllib.parse import urlsplit

from relay_idem.options import ConflictPolicy, FingerprintMode, IdempotencyConfig, MismatchPolicy, StoreErrorPolicy
from relay_idem.routes import RoutePolicy
from relay_idem.scopes import authorization_scope, header_scope
from relay_idem.store import MemoryStore, RedisStore, Store
from relay_idem.store.redis_store import DEFAULT_MIN_REPLICAS_TIMEOUT, DEFAULT_SOCKET_TIMEOUT
from relay_idem.upstream import UpstreamClientName

# The environment variable that carries a Config to worker processes.
WORKER_CONFIG_ENV = "_RELAY_IDEM_WORKER_CONFIG"
DEFAULT_PREFIX = "relay-idem"
MIDDLEWARE_DEFAULTS = IdempotencyConfig()

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class ConfigError(ValueError):
    """A setting that cannot work; its message is one line, meant for the person who set it."""


def check_http_url(name: str, url: str) -> str:
    """``url`` if it is an absolute http(s) URL with a host, else :class:`ConfigError`."""
    try:
        parts = urlsplit(url)
        has_valid_port = parts.port is None or parts.port >= 0  # .port raises on a bad one
    except ValueError as exc:
        raise ConfigError(f"{name} {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not has_valid_port:
        raise ConfigError(f"{name} must be an http:// or https:// URL with a host, not {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name} must not have a query or a fragment: {url!r}")
    return url


REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel")


def check_redis_url(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in REDIS_SCHEMES or "://" not in url:
        raise ConfigError(f"--redis must be a {', '.join(s + '://' for s in REDIS_SCHEMES)} URL, not {url!r}")
    return url


@dataclass(frozen=True, slots=True)
class Config:
    """Everything ``relay-idem proxy`` is started with. Middleware options mirror :class:`IdempotencyConfig`."""

    upstream: str
    redis: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    prefix: str = DEFAULT_PREFIX
    upstream_timeout: float = 60.0
    upstream_client: UpstreamClientName = "httptools"
    min_replicas: int = 0
    min_replicas_timeout: float = DEFAULT_MIN_REPLICAS_TIMEOUT
    log_level: LogLevel = "info"
    access_log: bool = False
    # What one client may cost a worker (SPEC §4, hostile clients); nginx's defaults are the model.
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    max_connections: int = 10_000
    # Middleware options (SPEC §1), with the middleware's own defaults.
    header_name: str = MIDDLEWARE_DEFAULTS.header_name
    methods: tuple[str, ...] = tuple(MIDDLEWARE_DEFAULTS.methods)
    require_key: tuple[str, ...] = tuple(MIDDLEWARE_DEFAULTS.require_key)
    ttl: float = MIDDLEWARE_DEFAULTS.ttl
    lock_ttl: float = MIDDLEWARE_DEFAULTS.lock_ttl
    on_conflict: ConflictPolicy = MIDDLEWARE_DEFAULTS.on_conflict
    wait_timeout: float = MIDDLEWARE_DEFAULTS.wait_timeout
    on_mismatch: MismatchPolicy = MIDDLEWARE_DEFAULTS.on_mismatch
    fingerprint: FingerprintMode = MIDDLEWARE_DEFAULTS.fingerprint
    fingerprint_header: tuple[str, ...] = tuple(MIDDLEWARE_DEFAULTS.fingerprint_headers)
    scope_header: str | None = None
    max_waiters: int = MIDDLEWARE_DEFAULTS.max_waiters
    max_request_bytes: int = MIDDLEWARE_DEFAULTS.max_request_bytes
    max_response_bytes: int = MIDDLEWARE_DEFAULTS.max_response_bytes
    on_store_error: StoreErrorPolicy = MIDDLEWARE_DEFAULTS.on_store_error
    complete_retry: float = MIDDLEWARE_DEFAULTS.complete_retry
    key: str | None = MIDDLEWARE_DEFAULTS.key
    replay_exclude_header: tuple[str, ...] = tuple(MIDDLEWARE_DEFAULTS.replay_exclude_headers)
    # [[route]] tables of a --config file: plain values, so that they travel to worker processes as JSON.
    routes: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        check_http_url("--upstream", self.upstream)
        if self.redis is not None:
            check_redis_url(self.redis)
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, not {self.workers}")
        if self.workers > 1 and self.redis is None:
            raise ConfigError(
                f"--workers {self.workers} needs --redis: the memory store is not shared between processes"
            )
        if self.min_replicas < 0:
            raise ConfigError(f"--min-replicas must not be negative, not {self.min_replicas}")
        if self.min_replicas and self.redis is None:
            raise ConfigError("--min-replicas needs --redis")
        if self.min_replicas and self.redis is not None and urlsplit(self.redis).scheme == "redis+cluster":
            raise ConfigError(
                "--min-replicas is not supported on Redis Cluster (redis+cluster://): use a standalone or Sentinel URL"
            )
        if not 0 < self.min_replicas_timeout < DEFAULT_SOCKET_TIMEOUT:
            raise ConfigError(
                f"--min-replicas-timeout must be more than 0 and less than the Redis socket timeout "
                f"({DEFAULT_SOCKET_TIMEOUT:g} s), not {self.min_replicas_timeout:g}"
            )
        for name in ("upstream_timeout", "header_timeout", "body_timeout", "send_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, not {getattr(self, name)}")
        if self.max_header_bytes < 1024:
            raise ConfigError(f"--max-header-bytes must be at least 1024, not {self.max_header_bytes}")
        if self.max_connections < 1:
            raise ConfigError(f"--max-connections must be at least 1, not {self.max_connections}")
        if self.upstream_client == "aiohttp" and find_spec("aiohttp") is None:
            raise ConfigError("--upstream-client aiohttp needs aiohttp: pip install 'relay-idem[aiohttp]'")
        try:
            self.idempotency()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def idempotency(self) -> IdempotencyConfig:
        """The middleware's options."""
        return IdempotencyConfig(
            header_name=self.header_name,
            methods=tuple(method.upper() for method in self.methods),
            require_key=self.require_key,
            ttl=self.ttl,
            lock_ttl=self.lock_ttl,
            on_conflict=self.on_conflict,
            wait_timeout=self.wait_timeout,
            on_mismatch=self.on_mismatch,
            fingerprint=self.fingerprint,
            fingerprint_headers=self.fingerprint_header,
            scope=header_scope(self.scope_header) if self.scope_header else authorization_scope,
            max_waiters=self.max_waiters,
            max_request_bytes=self.max_request_bytes,
            max_response_bytes=self.max_response_bytes,
            on_store_error=self.on_store_error,
            complete_retry=self.complete_retry,
            key=self.key,
            replay_exclude_headers=self.replay_exclude_header,
            routes=tuple(RoutePolicy.from_table(route) for route in self.routes),
        )

    def open_store(self) -> Store:
        """A new store for this config: Redis with ``--redis``, else the memory store."""
        return open_store(
            self.redis,
            prefix=self.prefix,
            min_replicas=self.min_replicas,
            min_replicas_timeout=self.min_replicas_timeout,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        fields: dict[str, Any] = json.loads(text)
        for name, value in fields.items():
            if isinstance(value, list):
                fields[name] = tuple(value)
        return cls(**fields)

    @classmethod
    def from_environment(cls) -> Config:
        """The config a ``--workers`` parent left for its workers."""
        text = os.environ.get(WORKER_CONFIG_ENV)
        if text is None:
            raise RuntimeError(f"{WORKER_CONFIG_ENV} is not set: start workers with `relay-idem proxy --workers N`")
        return cls.from_json(text)


def open_store(
    redis: str | None,
    *,
    prefix: str = DEFAULT_PREFIX,
    min_replicas: int = 0,
    min_replicas_timeout: float = DEFAULT_MIN_REPLICAS_TIMEOUT,
) -> Store:
    """``RedisStore`` for a URL, the memory store for None. ``min_replicas`` (and its timeout) is passed on
    only when set."""
    if redis is None:
        return MemoryStore(prefix=prefix)
    options: dict[str, Any] = (
        {"min_replicas": min_replicas, "min_replicas_timeout": min_replicas_timeout} if min_replicas else {}
    )
    return RedisStore.from_url(redis, prefix=prefix, **options)
