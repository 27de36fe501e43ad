"""The scenario grid: every target (an app variant) crossed with the load modes it supports.

A scenario is named ``<target>-<mode>``, plus ``-w<N>`` with N worker processes, except the bare
app's plain run, named ``bare``. Scenarios fall into groups that can be run on their own
(``--only``) because every ratio stays inside its group: ``middleware`` (against ``bare`` in the
same round), ``storm`` (against ``bare-storm``/``bare-storm-w2``), ``proxy`` (the proxies in front
of the nginx fast upstream, against ``proxy-nginx-<mode>``) and ``soak``.
"""

from __future__ import annotations

import enum
import fnmatch
import importlib.util
from dataclasses import dataclass


class Mode(enum.StrEnum):
    FIRST = "first"  # a unique Idempotency-Key per request: every request executes
    REPLAY = "replay"  # one key for the whole run: every request after the first is a replay
    NOKEY = "nokey"  # no Idempotency-Key header at all
    STORM = "storm"  # bursts of concurrent duplicates of one key, against a slow app
    SOAK = "soak"  # the proxy under a long run of unique keys, its RSS sampled every second
    WAKE = "wake"  # wait mode: how soon waiting repeats get the replay (in-process, no load)

    @property
    def description(self) -> str:
        return _MODE_DESCRIPTIONS[self]


_MODE_DESCRIPTIONS = {
    Mode.FIRST: "unique key (first execution)",
    Mode.REPLAY: "same key (replay)",
    Mode.NOKEY: "no key",
    Mode.STORM: "conflict storm (duplicates in flight)",
    Mode.SOAK: "proxy soak (unique keys, RSS over time)",
    Mode.WAKE: "wait mode: replay after the first request is done",
}


class Group(enum.StrEnum):
    """Scenarios that can be run, and rerun, on their own (``--only``)."""

    MIDDLEWARE = "middleware"  # first / replay / no key of the middlewares, against the bare app
    STORM = "storm"  # conflict storms, 1 and 2 workers
    PROXY = "proxy"  # proxies in front of the nginx fast upstream, against nginx proxy_pass
    SOAK = "soak"  # the proxy's RSS over a long run of unique keys


class Server(enum.StrEnum):
    """What a target runs."""

    UVICORN = "uvicorn"  # Target.app under uvicorn
    NGINX = "nginx"  # nginx proxy_pass with a keep-alive upstream pool (the reference proxy)
    RELAY_IDEM = "relay-idem"  # relay-idem proxy (benchmarks.procs.PROXY_COMMAND)


MIDDLEWARE_MODES = (Mode.FIRST, Mode.REPLAY, Mode.NOKEY, Mode.STORM)
PROXY_MODES = (Mode.FIRST, Mode.REPLAY, Mode.NOKEY)
# Storms run with 1 and with 2 worker processes: an in-process store cannot see the other worker's keys.
STORM_WORKERS = (1, 2)
NGINX_PROXY = "proxy-nginx"  # the reference of the proxy group


@dataclass(frozen=True, slots=True)
class Target:
    """One thing to put load on.

    Most targets are an app module served by uvicorn, optionally behind relay-idem's proxy
    (``proxy``). Targets with ``fast_upstream`` are proxies in front of nginx answering a fixed 202
    (the proxy group): ``server`` says which proxy, ``app`` is its ASGI app when it is uvicorn.
    """

    name: str
    app: str  # import string served by uvicorn ("" when the server is not uvicorn)
    modes: tuple[Mode, ...]
    store: str  # what the layer keeps its records in, for the report
    requires: tuple[str, ...] = ()  # importable modules without which it cannot run
    enabled: bool = True  # part of the default selection
    proxy: bool = False  # put `relay-idem proxy` (benchmarks.procs.PROXY_COMMAND) in front of `app`
    redis_commands: bool = True  # count Redis commands per request (MONITOR phase)
    server: Server = Server.UVICORN
    fast_upstream: bool = False  # in front of the nginx fast upstream instead of an app (the proxy group)
    workers: tuple[int, ...] = (1,)  # worker processes of the non-storm scenarios

    def missing(self) -> list[str]:
        """Modules in ``requires`` that cannot be imported here."""
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


TARGETS: tuple[Target, ...] = (
    Target("bare", "benchmarks.apps.bare:app", (Mode.NOKEY, Mode.STORM), store="-"),
    Target(
        "asgi-idempotency-header",
        "benchmarks.apps.asgi_idempotency_header:app",
        MIDDLEWARE_MODES,
        store="redis",
        requires=("idempotency_header_middleware", "fastapi"),
    ),
    Target(
        "fastapi-idempotency",
        "benchmarks.apps.fastapi_idempotency:app",
        MIDDLEWARE_MODES,
        store="memory (no Redis store)",
        requires=("fastapi_idempotency",),
        redis_commands=False,
    ),
    Target(
        "idemkit",
        "benchmarks.apps.idemkit_middleware:app",
        MIDDLEWARE_MODES,
        store="redis",
        requires=("idemkit", "redis"),
    ),
    Target(
        "relay-idem",
        "benchmarks.apps.relay_idem_middleware:app",
        (*MIDDLEWARE_MODES, Mode.WAKE),
        store="redis",
        requires=("relay_idem",),
    ),
    # relay-idem's proxy in front of the bare app, for what needs the app's execution counts: the
    # storms (duplicates executed) and the soak (RSS over N executed keys; once per run, after the rounds).
    Target(
        "relay-idem-proxy",
        "benchmarks.apps.bare:app",
        (Mode.STORM, Mode.SOAK),
        store="redis",
        requires=("relay_idem",),
        proxy=True,
    ),
    # The proxy group (SPEC §7 "Proxy, against nginx"): one proxy process each in front of the same
    # nginx fast upstream; what is measured is the CPU of the proxy's own processes per request.
    Target(NGINX_PROXY, "", PROXY_MODES, store="-", server=Server.NGINX, fast_upstream=True, redis_commands=False),
    Target(
        "proxy-asgiproxy",
        "benchmarks.apps.asgiproxy_app:app",
        PROXY_MODES,
        store="-",
        requires=("asgiproxy",),
        fast_upstream=True,
        redis_commands=False,
    ),
    Target(
        "proxy-relay-idem",
        "",
        PROXY_MODES,
        store="redis",
        requires=("relay_idem",),
        server=Server.RELAY_IDEM,
        fast_upstream=True,
        workers=(1, 2),
    ),
)


@dataclass(frozen=True, slots=True)
class Scenario:
    target: Target
    mode: Mode
    workers: int = 1  # worker processes of the app (and of the proxy in front of it), or of the proxy

    @property
    def kind(self) -> str:
        """The mode, plus ``-w<N>`` with more than one worker: a row of the summary table."""
        return f"{self.mode}-w{self.workers}" if self.workers > 1 else str(self.mode)

    @property
    def name(self) -> str:
        if self.target.name == "bare" and self.kind == Mode.NOKEY:
            return "bare"
        return f"{self.target.name}-{self.kind}"

    @property
    def description(self) -> str:
        return describe_kind(self.kind)

    @property
    def group(self) -> Group:
        if self.mode is Mode.STORM:
            return Group.STORM
        if self.mode is Mode.SOAK:
            return Group.SOAK
        return Group.PROXY if self.target.fast_upstream else Group.MIDDLEWARE

    @property
    def baseline(self) -> str | None:
        """The scenario this one's throughput (and, in the proxy group, CPU) is divided by, same round."""
        if self.mode in (Mode.SOAK, Mode.WAKE):
            return None
        if self.target.fast_upstream:
            base = f"{NGINX_PROXY}-{self.mode}"
        else:
            base = f"bare-{self.kind}" if self.mode is Mode.STORM else "bare"
        return None if base == self.name else base


def describe_kind(kind: str) -> str:
    """``storm-w2`` -> "conflict storm (duplicates in flight), 2 workers"."""
    mode, _, workers = kind.partition("-w")
    text = Mode(mode).description
    if mode == Mode.STORM:
        text += f", {workers or 1} worker{'s' if workers else ''}"
    elif workers:
        text += f", {workers} workers"
    return text


def kind_order(kind: str) -> tuple[int, int]:
    """Sort key of summary rows: modes in grid order, then by workers."""
    mode, _, workers = kind.partition("-w")
    return list(Mode).index(Mode(mode)), int(workers or 1)


def all_scenarios() -> list[Scenario]:
    return [
        Scenario(target, mode, workers)
        for target in TARGETS
        for mode in target.modes
        for workers in (STORM_WORKERS if mode is Mode.STORM else (1,) if mode is Mode.SOAK else target.workers)
    ]


def select(patterns: str | None, groups: str | None = None) -> list[Scenario]:
    """Scenarios matching comma-separated names or fnmatch patterns, in grid order.

    A target name selects all of its scenarios (``fastapi-idempotency``), unless it is also a
    scenario name: ``bare`` is the plain bare run, ``bare*`` adds ``bare-storm``. ``None`` selects
    every scenario of every enabled target. ``groups`` (comma-separated :class:`Group` names) keeps
    only the scenarios of those groups. An unknown name raises ``ValueError``.
    """
    scenarios = all_scenarios()
    if groups is not None:
        wanted = {part.strip() for part in groups.split(",") if part.strip()}
        unknown = wanted - {str(group) for group in Group}
        if unknown:
            raise ValueError(f"unknown group(s) {', '.join(sorted(unknown))}; known: {', '.join(Group)}")
        scenarios = [s for s in scenarios if s.group in wanted]
    if patterns is None:
        return [s for s in scenarios if s.target.enabled]
    chosen: set[str] = set()
    for raw in patterns.split(","):
        pattern = raw.strip()
        if not pattern:
            continue
        hits = {s.name for s in scenarios if s.name == pattern} or {
            s.name
            for s in scenarios
            if fnmatch.fnmatchcase(s.name, pattern) or fnmatch.fnmatchcase(s.target.name, pattern)
        }
        if not hits:
            known = ", ".join(s.name for s in scenarios)
            raise ValueError(f"no scenario matches {pattern!r}; known: {known}")
        chosen |= hits
    return [s for s in scenarios if s.name in chosen]
