"""Prometheus metrics (SPEC §5), registered in prometheus-client's default registry.

Mount them with ``prometheus_client.make_asgi_app()`` beside your app. The proxy exposes them at
``/_relay/metrics``, summed over its workers (prometheus-client multiprocess mode).
"""

from __future__ import annotations

import bisect
import itertools
import os
import threading
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Workers that share their metrics through files (the proxy with --workers N) count as they go, in
# those files; a process of its own keeps the hot path's counts in itertools.count (below).
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class FastCount:
    """A counter child for the request path: ``inc()`` steps an ``itertools.count``, and the steps are
    added to the prometheus-client child whenever the registry collects.

    Measured (benchmarks/README.md, "the hot path"): ~40 ns per count against ~380 ns for the child's
    locked ``inc``, about 4 % of the bare app's CPU per request on the path that has no key. A step
    of ``itertools.count`` is one C call, so counts from several threads are not lost.
    """

    __slots__ = ("child", "folded", "lock", "steps")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self.steps = itertools.count()
        self.folded = 0
        self.lock = threading.Lock()

    def inc(self, amount: float = 1) -> None:
        if amount == 1:
            next(self.steps)
        else:
            self.child.inc(amount)

    def fold(self) -> None:
        """Add the steps taken since the last fold to the child (``repr`` is the one public view of a count)."""
        with self.lock:
            total = int(repr(self.steps)[6:-1])
            if total > self.folded:
                self.child.inc(total - self.folded)
                self.folded = total


class FastTiming:
    """A histogram child's ``observe`` without its wrapper: one bucket and the sum, each a locked value.

    ~540 ns against ~1,260 ns per observation; it writes the child's own values, so it counts in
    multiprocess mode too.
    """

    __slots__ = ("bounds", "buckets", "total")

    def __init__(self, child: Histogram) -> None:
        self.bounds = child._upper_bounds
        self.buckets = child._buckets
        self.total = child._sum

    def observe(self, amount: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, amount)].inc(1)
        self.total.inc(amount)


FAST_COUNTS: list[FastCount] = []


class Fold(Collector):
    """Registered before the metrics, so every collection sees the counts taken so far."""

    def collect(self) -> Iterable[Metric]:
        for count in FAST_COUNTS:
            count.fold()
        return ()


REGISTRY.register(Fold())

OUTCOMES = ("executed", "replayed", "conflict", "mismatch", "invalid", "bypass", "store_error", "not_stored")
FUNCTION_OUTCOMES = ("executed", "replayed", "conflict", "mismatch", "released", "store_error", "not_stored")
STORE_OPERATIONS = ("begin", "complete", "release", "renew")
GIVE_UP_REASONS = ("timeout", "overflow", "stopped")

REQUESTS = Counter(
    "relay_idem_requests",
    "Requests seen by relay-idem, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
FUNCTION_CALLS = Counter(
    "relay_idem_function_calls",
    "Calls of @idempotent functions, by outcome (SPEC 8.4).",
    ["outcome"],
    registry=REGISTRY,
)
STORE_SECONDS = Histogram(
    "relay_idem_store_seconds",
    "Time spent in one store operation.",
    ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=REGISTRY,
)
LEASE_LOST = Counter(
    "relay_idem_lease_lost",
    "Claims lost before their request finished (the late write was refused by the owner token).",
    registry=REGISTRY,
)
PENDING_WRITES = Gauge(
    "relay_idem_pending_writes",
    "Outcome writes (completions and releases) the store failed to take, being retried (SPEC 3.8).",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
WRITES_GIVEN_UP = Counter(
    "relay_idem_writes_given_up",
    "Outcome writes given up: complete_retry ran out (timeout), too many pending (overflow), or the "
    "process stopped retrying (stopped).",
    ["reason"],
    registry=REGISTRY,
)


class Count(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Timing(Protocol):
    def observe(self, amount: float) -> None: ...


# Bound label children: the hot path skips the label lookup. Once the app sets an OpenTelemetry
# tracer provider, relay_idem.tracing replaces OUTCOME's and STORE_TIME's values with wrappers that
# also mark the request's span; until then they are prometheus-client's own objects.
OUTCOME: dict[str, Count] = {outcome: REQUESTS.labels(outcome) for outcome in OUTCOMES}
if not MULTIPROCESS:
    FAST_COUNTS.extend(FastCount(REQUESTS.labels(outcome)) for outcome in OUTCOMES)
    OUTCOME.update(zip(OUTCOMES, FAST_COUNTS, strict=True))
FUNCTION_OUTCOME = {outcome: FUNCTION_CALLS.labels(outcome) for outcome in FUNCTION_OUTCOMES}
STORE_TIME: dict[str, Timing] = {op: FastTiming(STORE_SECONDS.labels(op)) for op in STORE_OPERATIONS}
GIVEN_UP = {reason: WRITES_GIVEN_UP.labels(reason) for reason in GIVE_UP_REASONS}
