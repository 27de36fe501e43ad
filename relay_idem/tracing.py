"""OpenTelemetry spans (README "Tracing"), at no cost to an app that does not trace.

relay-idem never imports OpenTelemetry itself. It joins in once the app has imported
``opentelemetry-api`` (``pip install 'relay-idem[otel]'``) and set a tracer provider; it looks
when this module is imported, when a middleware is built and when a keyed request arrives. Until
then the metrics below are prometheus-client's own objects and a request without a key runs no
line of tracing code; an app that never configures a provider never pays more than a dict lookup
per keyed request.

From then on the metrics the middleware already moves carry the spans, so no outcome site has
code of its own:

- each count of ``metrics.OUTCOME[outcome]`` sets ``idempotency.outcome`` and
  ``idempotency.replayed`` on the span that is current (the request's span);
- each timing of ``metrics.STORE_TIME[op]`` becomes a child span ``relay_idem.store.<op>`` with
  the call's own start and end (a store call that raised has no timing, hence no span: its
  request's outcome says ``store_error`` or ``not_stored``);
- :func:`keyed_request` sets ``idempotency.key_hint``, the key's first 4 characters, as the logs do.

Nothing is recorded without a current, recording span: relay-idem never starts a trace itself.
"""

from __future__ import annotations

import sys
import time
from types import ModuleType
from typing import TYPE_CHECKING

from relay_idem import metrics
from relay_idem.keys import key_hint

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

OUTCOME_ATTRIBUTE = "idempotency.outcome"
REPLAYED_ATTRIBUTE = "idempotency.replayed"
KEY_HINT_ATTRIBUTE = "idempotency.key_hint"
STORE_SPAN_PREFIX = "relay_idem.store."

_trace: ModuleType | None = None  # opentelemetry.trace, once a tracer provider is set


def refresh() -> ModuleType | None:
    """``opentelemetry.trace`` once the app has set a tracer provider (tracing then starts), else None.

    A provider is set once per process, so once found it is never looked for again.
    """
    global _trace
    if _trace is not None:
        return _trace
    trace = sys.modules.get("opentelemetry.trace")
    # The API keeps the provider the app set in this module global; it stays None until one is set
    # (directly, by opentelemetry-instrument, or from OTEL_PYTHON_TRACER_PROVIDER on first use).
    if trace is None or getattr(trace, "_TRACER_PROVIDER", None) is None:
        return None
    _trace = trace
    tracer = trace.get_tracer("relay_idem")
    for outcome, count in metrics.OUTCOME.items():
        metrics.OUTCOME[outcome] = TracedOutcome(trace, outcome, count)
    for op, timing in metrics.STORE_TIME.items():
        metrics.STORE_TIME[op] = TracedStoreTime(trace, tracer, op, timing)
    return trace


def keyed_request(key: str) -> None:
    """A request with a valid key: look for a tracer provider, and name the key on the request's span.

    Inlined checks: this runs on every keyed request, traced or not.
    """
    trace = _trace
    if trace is None:
        otel = sys.modules.get("opentelemetry.trace")
        if otel is None or getattr(otel, "_TRACER_PROVIDER", None) is None:
            return
        trace = refresh()
        assert trace is not None
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(KEY_HINT_ATTRIBUTE, key_hint(key))


class TracedOutcome:
    """``metrics.OUTCOME[outcome]`` while tracing: counts, then marks the current span with the outcome."""

    __slots__ = ("attributes", "count", "trace")

    def __init__(self, trace: ModuleType, outcome: str, count: metrics.Count) -> None:
        self.trace = trace
        self.count = count.inc
        self.attributes = {OUTCOME_ATTRIBUTE: outcome, REPLAYED_ATTRIBUTE: outcome == "replayed"}

    def inc(self, amount: float = 1) -> None:
        self.count(amount)
        span = self.trace.get_current_span()
        if span.is_recording():
            span.set_attributes(self.attributes)


class TracedStoreTime:
    """``metrics.STORE_TIME[op]`` while tracing: observes, then records the call as a child span."""

    __slots__ = ("name", "observe_seconds", "trace", "tracer")

    def __init__(self, trace: ModuleType, tracer: Tracer, op: str, timing: metrics.Timing) -> None:
        self.trace = trace
        self.tracer = tracer
        self.name = STORE_SPAN_PREFIX + op
        self.observe_seconds = timing.observe

    def observe(self, seconds: float) -> None:
        self.observe_seconds(seconds)
        if self.trace.get_current_span().is_recording():
            ended = time.time_ns()
            kind = self.trace.SpanKind.CLIENT
            span = self.tracer.start_span(self.name, kind=kind, start_time=ended - round(seconds * 1e9))
            span.end(end_time=ended)


refresh()
