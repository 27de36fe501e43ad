"""Per-route policies (SPEC §8.1): which options a request gets, decided by its path and method.

Everything here is prepared when the middleware is built: patterns are compiled once, each route's
options are merged with the middleware's into one :class:`Policy`, and a bad route is a
``ValueError`` then, never at request time. Matching a request is one call per route, in order.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import operator
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from relay_idem.keys import KeySource
from relay_idem.options import IdempotencyConfig

OPTION_NAMES = frozenset(field.name for field in dataclasses.fields(IdempotencyConfig))
# A route sets any option but these: identity (scope, header_name) stays global, and the rest are
# the route's own fields.
ROUTE_FIELDS = ("methods", "enabled", "require_key", "key")
ROUTE_OPTIONS = OPTION_NAMES - {"scope", "header_name", "routes", *ROUTE_FIELDS}

PathMatcher = Callable[[str], bool]


WILDCARDS = frozenset("*?[")


def path_matcher(patterns: Collection[str]) -> PathMatcher | None:
    """One prepared matcher for fnmatch ``patterns`` (any of them matches), or None for no pattern.

    The common shapes skip the regex engine: a plain path is compared, ``/prefix*`` is a
    ``startswith``; anything else is one regex compiled here.
    """
    if not patterns:
        return None
    if len(patterns) == 1:
        [pattern] = patterns
        if not WILDCARDS & set(pattern):
            return pattern.__eq__
        if pattern.endswith("*") and not WILDCARDS & set(pattern[:-1]):
            return operator.methodcaller("startswith", pattern[:-1])
    match = re.compile("|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in patterns)).match
    return lambda path: match(path) is not None


def _check_collection(name: str, value: object) -> None:
    if isinstance(value, str | bytes) or not isinstance(value, Collection):
        raise ValueError(f"{name} takes a collection of strings, not {value!r}")
    if not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name} takes strings only, not {value!r}")


class RoutePolicy:
    """Options for requests whose path matches ``path`` (an fnmatch pattern), e.g.

    ``RoutePolicy("/webhooks/github", key="header:X-GitHub-Delivery", require_key=True)``.

    ``methods`` (default: the middleware's) are the methods the route covers; ``enabled=False``
    passes matching requests straight through; ``require_key`` True rejects a covered request
    without a key, False overrides the middleware's ``require_key`` patterns, None leaves them to
    decide; ``key`` is a key source (SPEC §8.2); ``options`` are any other middleware options but
    ``scope`` and ``header_name``. Unset options inherit the middleware's.
    """

    __slots__ = ("enabled", "key", "methods", "options", "path", "require_key")

    def __init__(
        self,
        path: str,
        *,
        methods: Collection[str] | None = None,
        enabled: bool = True,
        require_key: bool | None = None,
        key: str | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"a route's path pattern must start with '/', not {path!r}")
        unknown = sorted(set(options) - ROUTE_OPTIONS)
        if unknown:
            allowed = ", ".join(sorted(ROUTE_OPTIONS | set(ROUTE_FIELDS)))
            raise ValueError(f"route {path!r}: unknown option {', '.join(unknown)} (a route takes {allowed})")
        if methods is not None:
            _check_collection(f"route {path!r}: methods", methods)
        if not isinstance(enabled, bool):
            raise ValueError(f"route {path!r}: enabled must be True or False, not {enabled!r}")
        if require_key is not None and not isinstance(require_key, bool):
            raise ValueError(f"route {path!r}: require_key must be True, False or None, not {require_key!r}")
        for name in ("fingerprint_headers", "replay_exclude_headers"):
            if name in options:
                _check_collection(f"route {path!r}: {name}", options[name])
        try:
            IdempotencyConfig(key=key, **options)  # the values' own checks
        except (TypeError, ValueError) as exc:
            raise ValueError(f"route {path!r}: {exc}") from None
        self.path = path
        self.methods = None if methods is None else tuple(method.upper() for method in methods)
        self.enabled = enabled
        self.require_key = require_key
        self.key = key
        self.options: Mapping[str, Any] = dict(options)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> RoutePolicy:
        """The route a ``[[route]]`` table describes: ``path`` and the other fields as keywords."""
        options = dict(table)
        if "path" not in options:
            raise ValueError(f"a route needs a path: {table!r}")
        return cls(options.pop("path"), **options)

    def __repr__(self) -> str:
        defaults = {"methods": None, "enabled": True, "require_key": None, "key": None}
        fields = {name: getattr(self, name) for name, default in defaults.items() if getattr(self, name) != default}
        given = [f"{name}={value!r}" for name, value in {**fields, **self.options}.items()]
        return f"RoutePolicy({', '.join([repr(self.path), *given])})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutePolicy):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Policy:
    """The options one request gets: the middleware's own, or a route's merged with them."""

    config: IdempotencyConfig
    methods: frozenset[str]
    source: KeySource
    required_paths: PathMatcher | None  # the require_key patterns; a route's True/False replaces them
    fingerprint_headers: tuple[bytes, ...]
    excluded: frozenset[bytes]  # response headers neither stored nor replayed

    @classmethod
    def build(cls, config: IdempotencyConfig, route: RoutePolicy | None = None) -> Policy:
        required_paths = path_matcher(config.require_key)
        methods = config.methods
        if route is not None:
            config = dataclasses.replace(config, **route.options, key=route.key or config.key)
            if route.methods is not None:
                methods = route.methods
            if route.require_key is not None:
                required_paths = always if route.require_key else None
        return cls(
            config=config,
            methods=frozenset(method.upper() for method in methods),
            source=config.key_source,
            required_paths=required_paths,
            fingerprint_headers=tuple(name.lower().encode("latin-1") for name in config.fingerprint_headers),
            excluded=frozenset(name.lower().encode("latin-1") for name in config.replay_exclude_headers),
        )

    def key_required(self, path: str) -> bool:
        return self.required_paths is not None and self.required_paths(path)


def always(path: str) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Route:
    """A route ready to match: the methods it covers, its prepared pattern, and its policy."""

    methods: frozenset[str]
    matches: PathMatcher
    policy: Policy | None  # None: disabled, straight through

    @classmethod
    def build(cls, config: IdempotencyConfig, route: RoutePolicy) -> Route:
        if not isinstance(route, RoutePolicy):
            raise ValueError(f"routes takes RoutePolicy values, not {route!r}")
        matcher = path_matcher([route.path])
        assert matcher is not None
        policy = Policy.build(config, route)
        return cls(policy.methods, matcher, policy if route.enabled else None)


def route_policy(routes: tuple[Route, ...], default: Policy, method: str, path: str) -> Policy | None:
    """The policy of the first route that covers ``method`` on ``path``, else ``default``.

    None: the request passes straight through (a disabled route, or a method nothing covers).
    """
    for route in routes:
        if method in route.methods and route.matches(path):
            return route.policy
    return default if method in default.methods else None
