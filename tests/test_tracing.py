"""OpenTelemetry (README "Tracing"): outcome attributes on the request's span, store calls as child spans,
and nothing at all — not even an import — for an app that does not trace.

The SDK's tracer provider is process-wide and can be set only once: this module sets it, with an
in-memory exporter, for the rest of the session. The "nothing at all" tests run in fresh interpreters.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from relay_idem import IdempotencyMiddleware, Store
from relay_idem.metrics import OUTCOME, OUTCOMES
from relay_idem.tracing import TracedOutcome
from tests.apps import Counter, Receive, Scope, Send, Slow, Statuses, call, idem
from tests.test_middleware_errors import FailingStore

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    exporter.clear()


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter


def server(app: Any) -> Any:
    """What a tracing middleware (opentelemetry-instrumentation-asgi) does around the app: a current server span."""
    tracer = trace.get_tracer("tests")

    async def traced(scope: Scope, receive: Receive, send: Send) -> None:
        with tracer.start_as_current_span(f"{scope['method']} {scope['path']}", kind=trace.SpanKind.SERVER):
            await app(scope, receive, send)

    return traced


def request_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    [span] = [span for span in exporter.get_finished_spans() if span.kind == trace.SpanKind.SERVER]
    return span


def store_spans(exporter: InMemorySpanExporter) -> list[str]:
    """The names of the store's child spans, in the order they started, checked to sit inside the request span."""
    parent = request_span(exporter)
    children = [span for span in exporter.get_finished_spans() if span.name.startswith("relay_idem.")]
    for child in children:
        assert child.parent is not None and child.parent.span_id == parent.context.span_id
        assert child.kind == trace.SpanKind.CLIENT
        assert parent.start_time <= child.start_time <= child.end_time <= parent.end_time
    return [child.name for child in sorted(children, key=lambda span: span.start_time)]


def attributes(exporter: InMemorySpanExporter) -> dict[str, Any]:
    return {name: value for name, value in (request_span(exporter).attributes or {}).items() if name.startswith("idem")}


async def test_a_first_execution_marks_its_span_and_its_two_store_calls_are_child_spans(
    spans: InMemorySpanExporter, store: Store
) -> None:
    app = server(IdempotencyMiddleware(Counter(), store=store))
    result = await call(app, headers=idem("pedido-42-lembrete"))

    assert result.status == 200
    assert attributes(spans) == {
        "idempotency.outcome": "executed",
        "idempotency.replayed": False,
        "idempotency.key_hint": "pedi",
    }
    assert store_spans(spans) == ["relay_idem.store.begin", "relay_idem.store.complete"]


async def test_a_replay_is_marked_replayed_with_one_store_call(spans: InMemorySpanExporter) -> None:
    middleware = IdempotencyMiddleware(Counter())
    await call(middleware, headers=idem("pedido-42-lembrete"))
    spans.clear()
    result = await call(server(middleware), headers=idem("pedido-42-lembrete"))

    assert result.header(b"idempotent-replayed") == b"true"
    assert attributes(spans) == {
        "idempotency.outcome": "replayed",
        "idempotency.replayed": True,
        "idempotency.key_hint": "pedi",
    }
    assert store_spans(spans) == ["relay_idem.store.begin"]


async def test_a_request_without_a_key_is_marked_bypass_and_touches_no_store(spans: InMemorySpanExporter) -> None:
    await call(server(IdempotencyMiddleware(Counter())))

    assert attributes(spans) == {"idempotency.outcome": "bypass", "idempotency.replayed": False}
    assert store_spans(spans) == []


@pytest.mark.parametrize(
    ("headers", "body"),
    [(idem(b"bad key"), b""), ([*idem("a"), *idem("b")], b""), (idem("big"), b"x" * 11)],
    ids=["malformed key", "two key headers", "body too large"],
)
async def test_an_invalid_request_is_marked_invalid(
    spans: InMemorySpanExporter, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    result = await call(server(IdempotencyMiddleware(Counter(), max_request_bytes=10)), headers=headers, body=body)

    assert result.status in (400, 413)
    assert attributes(spans)["idempotency.outcome"] == "invalid"
    assert store_spans(spans) == []


async def test_a_mismatch_is_marked_mismatch(spans: InMemorySpanExporter) -> None:
    middleware = IdempotencyMiddleware(Counter())
    await call(middleware, headers=idem("used"))
    spans.clear()
    result = await call(server(middleware), headers=idem("used"), body=b"another body")

    assert result.status == 422
    assert attributes(spans) == {
        "idempotency.outcome": "mismatch",
        "idempotency.replayed": False,
        "idempotency.key_hint": "used",
    }


async def test_a_conflict_is_marked_conflict(spans: InMemorySpanExporter) -> None:
    gate = asyncio.Event()
    slow = Slow(gate)
    middleware = IdempotencyMiddleware(slow)
    first = asyncio.create_task(call(middleware, headers=idem("busy")))
    await slow.started.wait()
    conflict = await call(server(middleware), headers=idem("busy"))
    gate.set()
    await first

    assert conflict.status == 409
    assert attributes(spans)["idempotency.outcome"] == "conflict"


async def test_a_store_failure_is_marked_store_error_and_the_failed_call_has_no_span(
    spans: InMemorySpanExporter,
) -> None:
    result = await call(server(IdempotencyMiddleware(Counter(), store=FailingStore("begin"))), headers=idem("k"))

    assert result.status == 503
    assert attributes(spans)["idempotency.outcome"] == "store_error"
    assert store_spans(spans) == []


async def test_a_released_key_is_marked_not_stored(spans: InMemorySpanExporter) -> None:
    result = await call(server(IdempotencyMiddleware(Statuses(503))), headers=idem("k"))

    assert result.status == 503
    assert attributes(spans)["idempotency.outcome"] == "not_stored"
    assert store_spans(spans) == ["relay_idem.store.begin", "relay_idem.store.release"]


async def test_without_a_current_span_nothing_is_recorded(spans: InMemorySpanExporter) -> None:
    middleware = IdempotencyMiddleware(Counter())
    await call(middleware, headers=idem("k"))
    await call(middleware, headers=idem("k"))
    await call(middleware)

    assert spans.get_finished_spans() == ()


async def test_every_outcome_counts_once_through_the_traced_wrappers(exporter: InMemorySpanExporter) -> None:
    # With a provider set, each OUTCOME value is one wrapper around the prometheus child, never a
    # wrapper around a wrapper (which would count twice): building more middlewares changes nothing.
    IdempotencyMiddleware(Counter())
    IdempotencyMiddleware(Counter())
    assert set(OUTCOME) == set(OUTCOMES)
    for traced in OUTCOME.values():
        assert isinstance(traced, TracedOutcome)
        assert not isinstance(getattr(traced.count, "__self__", None), TracedOutcome)


# --- an app that does not trace pays nothing -----------------------------------------------------

# Serves a request without a key and a keyed one, then prints which OUTCOME wrappers are in place and
# whether any OpenTelemetry module was imported.
PROBE = """
import asyncio, sys
from relay_idem import IdempotencyMiddleware, metrics
from relay_idem.tracing import TracedOutcome, TracedStoreTime
from tests.apps import Counter, call, idem

async def main():
    middleware = IdempotencyMiddleware(Counter())
    await call(middleware)
    await call(middleware, headers=idem("k"))
    wrapped = [*metrics.OUTCOME.values(), *metrics.STORE_TIME.values()]
    plain = not any(isinstance(metric, (TracedOutcome, TracedStoreTime)) for metric in wrapped)
    imported = sorted(name for name, module in sys.modules.items() if module and name.split(".")[0] == "opentelemetry")
    print("plain" if plain else "traced", imported[:1])

asyncio.run(main())
"""


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def probe(prelude: str) -> str:
    return run_python(textwrap.dedent(prelude) + PROBE)


def test_without_opentelemetry_installed_nothing_is_imported_and_the_metrics_are_prometheus_own() -> None:
    # sys.modules[name] = None makes "import opentelemetry" fail, as it does when the extra is not installed.
    assert probe("import sys; sys.modules['opentelemetry'] = None") == "plain []"


def test_opentelemetry_imported_without_a_tracer_provider_changes_nothing() -> None:
    # (redis-py 8 imports opentelemetry itself whenever it is installed, for its own metrics.)
    assert probe("from opentelemetry import trace; trace.get_tracer('app')") == "plain ['opentelemetry']"


def test_a_tracer_provider_set_after_the_middleware_is_built_is_picked_up_by_the_first_keyed_request() -> None:
    code = textwrap.dedent("""
        import asyncio
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from relay_idem import IdempotencyMiddleware, metrics
        from relay_idem.tracing import TracedOutcome
        from tests.apps import Counter, call, idem

        async def main():
            middleware = IdempotencyMiddleware(Counter())
            trace.set_tracer_provider(TracerProvider())
            await call(middleware)
            print(type(metrics.OUTCOME["bypass"]) is TracedOutcome)
            await call(middleware, headers=idem("k"))
            print(type(metrics.OUTCOME["bypass"]) is TracedOutcome)

        asyncio.run(main())
    """)
    assert run_python(code).split() == ["False", "True"]
