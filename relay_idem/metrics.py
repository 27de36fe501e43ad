"""Prometheus metrics (SPEC §5), registered in prometheus-client's default registry.

Mount them with ``prometheus_client.make_asgi_app()`` beside your app. The proxy exposes them at
``/_relay/metrics``, summed over its workers (prometheus-client multiprocess mode).
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

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
FUNCTION_OUTCOME = {outcome: FUNCTION_CALLS.labels(outcome) for outcome in FUNCTION_OUTCOMES}
STORE_TIME: dict[str, Timing] = {op: STORE_SECONDS.labels(op) for op in STORE_OPERATIONS}
GIVEN_UP = {reason: WRITES_GIVEN_UP.labels(reason) for reason in GIVE_UP_REASONS}
