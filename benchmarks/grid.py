"""The scenario grid: every target (an app variant) crossed with the load modes it supports.

A scenario is named ``<target>-<mode>``, except the bare app's plain run, named ``bare``.
Ratios are taken against the bare app in the same round: ``bare-storm`` for storms,
``bare`` for everything else.
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

    @property
    def description(self) -> str:
        return _MODE_DESCRIPTIONS[self]


_MODE_DESCRIPTIONS = {
    Mode.FIRST: "unique key (first execution)",
    Mode.REPLAY: "same key (replay)",
    Mode.NOKEY: "no key",
    Mode.STORM: "conflict storm (duplicates in flight)",
    Mode.SOAK: "proxy soak (unique keys, RSS over time)",
}

MIDDLEWARE_MODES = (Mode.FIRST, Mode.REPLAY, Mode.NOKEY, Mode.STORM)
# Storms run with 1 and with 2 worker processes: an in-process store cannot see the other worker's keys.
STORM_WORKERS = (1, 2)


@dataclass(frozen=True, slots=True)
class Target:
    """One thing to put load on: an app module served by uvicorn, optionally behind the proxy."""

    name: str
    app: str  # import string served by uvicorn
    modes: tuple[Mode, ...]
    store: str  # what the layer keeps its records in, for the report
    requires: tuple[str, ...] = ()  # importable modules without which it cannot run
    enabled: bool = True  # part of the default selection
    proxy: bool = False  # put `relay-idem proxy` (benchmarks.procs.PROXY_COMMAND) in front of `app`
    redis_commands: bool = True  # count Redis commands per request (MONITOR phase)

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
        "relay-idem",
        "benchmarks.apps.relay_idem_middleware:app",
        MIDDLEWARE_MODES,
        store="redis",
        requires=("relay_idem",),
    ),
    # The proxy in front of the bare app; its ratios are to the bare app served directly.
    # Its soak runs once per run (not per round), after the rounds.
    Target(
        "relay-idem-proxy",
        "benchmarks.apps.bare:app",
        (*MIDDLEWARE_MODES, Mode.SOAK),
        store="redis",
        requires=("relay_idem",),
        proxy=True,
    ),
)


@dataclass(frozen=True, slots=True)
class Scenario:
    target: Target
    mode: Mode
    workers: int = 1  # uvicorn worker processes of the app (and of the proxy in front of it)

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
    def baseline(self) -> str | None:
        """The scenario this one's throughput is divided by (same round), if any."""
        if self.mode is Mode.SOAK:
            return None
        base = f"bare-{self.kind}" if self.mode is Mode.STORM else "bare"
        return None if base == self.name else base


def describe_kind(kind: str) -> str:
    """``storm-w2`` -> "conflict storm (duplicates in flight), 2 workers"."""
    mode, _, workers = kind.partition("-w")
    text = Mode(mode).description
    if mode == Mode.STORM:
        text += f", {workers or 1} worker{'s' if workers else ''}"
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
        for workers in (STORM_WORKERS if mode is Mode.STORM else (1,))
    ]


def select(patterns: str | None) -> list[Scenario]:
    """Scenarios matching comma-separated names or fnmatch patterns, in grid order.

    A target name selects all of its scenarios (``fastapi-idempotency``), unless it is also a
    scenario name: ``bare`` is the plain bare run, ``bare*`` adds ``bare-storm``. ``None`` selects
    every scenario of every enabled target. An unknown name raises ``ValueError``.
    """
    scenarios = all_scenarios()
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
