"""Built-in load generator for machines without wrk: aiohttp, N connections, fixed duration.

It reports the same figures as request.lua, but a Python client costs far more CPU per
request than wrk, so on a small machine it measures less and steals CPU from the app:
compare its numbers only with each other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp

from benchmarks.load.base import BODY, HEADERS, PATH, LoadResult, LoadSpec, key_for


def _status_class(status: int) -> str:
    if status == 409:
        return "409"
    return f"{min(status // 100, 5)}xx"


def _percentile(ordered: list[float], pct: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


async def _run(spec: LoadSpec, stop: Callable[[], bool] | None = None) -> LoadResult:
    latencies: list[float] = []
    status = {"2xx": 0, "3xx": 0, "409": 0, "4xx": 0, "5xx": 0}
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    counters = [0] * spec.threads
    url = spec.url + PATH
    timeout = aiohttp.ClientTimeout(total=spec.timeout)
    connector = aiohttp.TCPConnector(limit=spec.connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        started = time.perf_counter()
        stop_at = started + spec.duration

        async def worker(index: int) -> None:
            thread = index % spec.threads  # keys are grouped like wrk's threads
            while time.perf_counter() < stop_at and not (stop is not None and stop()):
                counters[thread] += 1
                headers = dict(HEADERS)
                key = key_for(spec, thread, counters[thread])
                if key is not None:
                    headers["Idempotency-Key"] = key
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=BODY, headers=headers) as response:
                        await response.read()
                        cls = _status_class(response.status)
                        status[cls] = status.get(cls, 0) + 1
                except TimeoutError:
                    errors["timeout"] += 1
                    continue
                except aiohttp.ClientConnectorError:
                    errors["connect"] += 1
                    await asyncio.sleep(0.01)
                    continue
                except aiohttp.ClientError:
                    errors["read"] += 1
                    continue
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker(i) for i in range(spec.connections)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return LoadResult(
        generator="python",
        requests=len(latencies),
        duration_s=elapsed,
        p50_ms=_percentile(ordered, 50) * 1000,
        p90_ms=_percentile(ordered, 90) * 1000,
        p99_ms=_percentile(ordered, 99) * 1000,
        max_ms=(ordered[-1] if ordered else 0.0) * 1000,
        status=status,
        errors=errors,
    )


def run_python(spec: LoadSpec, stop: Callable[[], bool] | None = None) -> LoadResult:
    """Load for ``spec.duration`` seconds, or until ``stop()`` (checked before each request) is true."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.run(_run(spec, stop))
    return uvloop.run(_run(spec, stop))
