"""``relay-idem proxy`` and its test upstream as real processes, for the scale and fault tests.

The upstream is ``tests/proxy_upstream.py`` under uvicorn: it counts its executions in its own
process (``GET /calls?id=``), so "executed once" is counted outside the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import httpx

from tests.servers import free_port, serve

MESSAGE = b'{"to": "+5511999998888", "template": "lembrete_consulta", "language": "pt_BR"}'
PROBLEM = "application/problem+json"


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key, "Content-Type": "application/json"}


@contextlib.contextmanager
def running_upstream(keep_alive: float | None = None) -> Iterator[str]:
    """tests/proxy_upstream.py under uvicorn; ``keep_alive`` sets how long it keeps an idle connection (5 s)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["uvicorn", "tests.proxy_upstream:app", "--port", str(port), "--log-level", "warning"]
    if keep_alive is not None:
        args = ["tests.proxy_upstream", str(port), str(keep_alive)]
    with serve(args, ready_url=f"{url}/calls"):
        yield url


@contextlib.contextmanager
def running_proxy(
    upstream: str, *options: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``relay-idem proxy --upstream <upstream> <options>`` on a free port; yields its URL and process.

    A process the test stopped (SIGSTOP) is continued first, so the teardown's SIGTERM reaches it.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["relay_idem", "proxy", "--upstream", upstream, "--port", str(port), "--log-level", "warning", *options]
    with serve(args, ready_url=f"{url}/_relay/healthz", env=env) as process:
        try:
            yield url, process
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGCONT)


async def calls(client: httpx.AsyncClient, upstream: str, name: str) -> dict[str, int]:
    """How often the upstream started and finished ``/work?id=name`` (or ran another endpoint)."""
    response = await client.get(f"{upstream}/calls", params={"id": name})
    result: dict[str, int] = response.json()
    return result


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, timeout: float, what: str, interval: float = 0.05
) -> float:
    """Await ``predicate()`` until it is true; return the seconds it took, fail after ``timeout``."""
    started = time.monotonic()
    while not await predicate():
        elapsed = time.monotonic() - started
        assert elapsed < timeout, f"{what}: not within {timeout} s"
        await asyncio.sleep(interval)
    return time.monotonic() - started


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample ``name`` in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(f"{name} ") or line.startswith(f"{name}{{}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def outcome(text: str, name: str) -> float:
    prefix = f'relay_idem_requests_total{{outcome="{name}"'
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
