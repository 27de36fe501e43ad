"""SPEC §1: what ``relay_idem`` exports (``__all__`` sorted and complete, as httpx checks its own)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect

import pytest

import relay_idem
import relay_idem.store

# SPEC §1: "relay_idem/__init__.py exports at least" these.
SPEC_EXPORTS = {
    "IdempotencyMiddleware",
    "IdempotencyConfig",
    "RedisStore",
    "MemoryStore",
    "Store",
    "authorization_scope",
    "header_scope",
    "default_final_status",
    "__version__",
    "RoutePolicy",
    "idempotent",
    "KeyInProgress",
    "KeyReused",
    "StoreUnavailable",
}


def test_all_is_sorted() -> None:
    assert relay_idem.__all__ == sorted(relay_idem.__all__)


def test_all_has_every_name_the_spec_lists() -> None:
    assert set(relay_idem.__all__) >= SPEC_EXPORTS


def test_all_has_no_duplicates_and_every_name_exists() -> None:
    assert len(set(relay_idem.__all__)) == len(relay_idem.__all__)
    for name in relay_idem.__all__:
        assert hasattr(relay_idem, name), name


def test_every_public_name_of_the_package_is_in_all() -> None:
    public = {
        name
        for name, value in vars(relay_idem).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert public <= set(relay_idem.__all__)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from relay_idem import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(relay_idem.__all__)


def test_store_subpackage_all_is_sorted_and_complete() -> None:
    assert relay_idem.store.__all__ == sorted(relay_idem.store.__all__)
    for name in relay_idem.store.__all__:
        assert hasattr(relay_idem.store, name), name
    assert relay_idem.store.Store is relay_idem.Store


def test_exported_classes_are_public_under_their_own_name() -> None:
    for name in relay_idem.__all__:
        value = getattr(relay_idem, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__name__ == name
            assert value.__module__.startswith("relay_idem.")


def test_version_matches_the_installed_distribution() -> None:
    assert relay_idem.__version__ == importlib.metadata.version("relay-idem")


def test_idempotency_config_is_a_frozen_dataclass_with_every_spec_option() -> None:
    config = relay_idem.IdempotencyConfig()
    assert dataclasses.is_dataclass(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ttl = 1  # type: ignore[misc]
    defaults = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    assert defaults == {
        "header_name": "Idempotency-Key",
        "methods": ("POST", "PATCH"),
        "require_key": (),
        "ttl": 86400,
        "lock_ttl": 10,
        "on_conflict": "reject",
        "wait_timeout": 10,
        "on_mismatch": "reject",
        "fingerprint": "raw",
        "fingerprint_headers": (),
        "scope": relay_idem.authorization_scope,
        "max_waiters": 1000,
        "final_status": relay_idem.default_final_status,
        "max_request_bytes": 1024 * 1024,
        "max_response_bytes": 1024 * 1024,
        "on_store_error": "closed",
        "complete_retry": 30,
        "routes": (),
        "key": None,
        "replay_exclude_headers": (),
    }


def test_keyword_options_override_config() -> None:
    async def app(scope: object, receive: object, send: object) -> None: ...

    config = relay_idem.IdempotencyConfig(ttl=60, on_conflict="wait")
    middleware = relay_idem.IdempotencyMiddleware(app, config=config, ttl=5)
    assert middleware.config.ttl == 5
    assert middleware.config.on_conflict == "wait"
    assert config.ttl == 60


@pytest.mark.parametrize(
    "options",
    [
        {"on_conflict": "queue"},
        {"on_mismatch": "ignore"},
        {"fingerprint": "xml"},
        {"on_store_error": "ajar"},
        {"ttl": 0},
        {"lock_ttl": -1},
        {"wait_timeout": 0},
        {"max_waiters": -1},
        {"complete_retry": -1},
        {"methods": "POST"},
        {"header_name": ""},
    ],
)
def test_invalid_options_are_refused_at_construction(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        relay_idem.IdempotencyConfig(**options)  # type: ignore[arg-type]


def test_default_final_status_releases_only_408_425_429_503() -> None:
    released = [status for status in range(100, 600) if not relay_idem.default_final_status(status)]
    assert released == [408, 425, 429, 503]


def test_memory_store_implements_the_store_protocol() -> None:
    assert isinstance(relay_idem.MemoryStore(), relay_idem.Store)
