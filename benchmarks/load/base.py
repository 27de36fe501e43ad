"""What a load run is asked to do, and what it reports."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

PATH = "/v1/messages"
BODY_JSON = {
    "to": "+5511999998888",
    "template": "lembrete_consulta",
    "language": "pt_BR",
    "variables": {"1": "João Silva"},
}
# Byte-identical to the body in request.lua.
BODY = json.dumps(BODY_JSON, ensure_ascii=False).encode()
HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class LoadSpec:
    url: str  # base URL, without PATH
    mode: str  # benchmarks.grid.Mode value
    run_id: str  # prefix of every key this run sends; unique per run
    duration: float
    connections: int
    threads: int = 1
    burst: int = 32  # storm: consecutive requests sharing one key
    timeout: float = 5.0


def key_for(spec: LoadSpec, thread: int, counter: int) -> str | None:
    """The Idempotency-Key of request number ``counter`` (from 1) of ``thread``; as request.lua does."""
    if spec.mode == "first":
        return f"{spec.run_id}-{thread}-{counter}"
    if spec.mode == "replay":
        return f"{spec.run_id}-replay"
    if spec.mode == "storm":
        return f"{spec.run_id}-{thread}-s{(counter - 1) // spec.burst}"
    return None


@dataclass(slots=True)
class LoadResult:
    generator: str
    requests: int  # completed responses
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    status: dict[str, int] = field(default_factory=dict)  # "2xx", "3xx", "409", "4xx" (other), "5xx"
    errors: dict[str, int] = field(default_factory=dict)  # socket errors: connect, read, write, timeout

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def ok_rps(self) -> float:
        """2xx answers per second: what the throughput verdicts count (errors answered fast are not throughput)."""
        return self.status.get("2xx", 0) / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def non_2xx(self) -> int:
        return self.requests - self.status.get("2xx", 0)

    def to_dict(self) -> dict[str, object]:
        return {
            "generator": self.generator,
            "requests": self.requests,
            "duration_s": round(self.duration_s, 3),
            "rps": round(self.rps, 1),
            "ok_rps": round(self.ok_rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p90_ms": round(self.p90_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "non_2xx": self.non_2xx,
            "status": dict(self.status),
            "errors": dict(self.errors),
        }
