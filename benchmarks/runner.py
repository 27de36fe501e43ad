"""Run the selected scenarios for N rounds (A B A B …), each in a fresh app process."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from benchmarks import load, monitor, procs
from benchmarks.apps.common import COUNT_URL_ENV, DELAY_ENV, EXECUTIONS_HASH, REDIS_URL_ENV
from benchmarks.grid import Mode, Scenario
from benchmarks.load.base import BODY, HEADERS, PATH, LoadSpec, key_for

Progress = Callable[[str], None]
PRIME_REQUESTS = 20  # sequential requests before the wrk warm-up: opens pools, primes the replay key
SETTLE_SECONDS = 0.3  # after a load phase, for requests still in flight


@dataclass(frozen=True, slots=True)
class Settings:
    scenarios: tuple[Scenario, ...]
    rounds: int
    duration: int  # seconds of measured load per scenario and round
    warmup: int  # seconds of load before it (0: only the PRIME_REQUESTS)
    connections: int
    threads: int
    generator: str  # "wrk" or "python"
    storm_burst: int
    storm_delay_ms: float
    monitor_requests: int
    quiet_pct: float  # before measuring, wait until other processes use less CPU than this (% of one CPU)
    quiet_timeout: float  # ... for at most this long (0: don't wait)
    out: Path
    repo: Path


def _count_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + "/1"


def _send(client: httpx.Client, url: str, key: str | None) -> int:
    headers = dict(HEADERS)
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(url, content=BODY, headers=headers).status_code


def _dispatched(client: httpx.Client, base: str) -> int:
    return int(client.get(base + "/v1/stats").json()["dispatched"])


def _storm_stats(counts: dict[bytes, bytes]) -> dict[str, int]:
    per_key = [int(n) for n in counts.values()]
    return {
        "keys": len(per_key),
        "executions": sum(per_key),
        "duplicate_executions": sum(n - 1 for n in per_key if n > 1),
        "keys_executed_more_than_once": sum(1 for n in per_key if n > 1),
        "max_executions_per_key": max(per_key, default=0),
    }


def run_one(scenario: Scenario, round_no: int, redis_url: str, settings: Settings) -> dict[str, Any]:
    """One scenario, one round: fresh Redis data, fresh app process; returns the JSON record."""
    target, mode = scenario.target, scenario.mode
    record: dict[str, Any] = {"scenario": scenario.name, "target": target.name, "mode": str(mode), "round": round_no}
    missing = target.missing()
    if missing:
        raise RuntimeError(f"cannot import {', '.join(missing)} (pip install -r benchmarks/requirements.txt)")
    env = {REDIS_URL_ENV: redis_url}
    if mode is Mode.STORM:
        env[COUNT_URL_ENV] = _count_url(redis_url)
        env[DELAY_ENV] = str(settings.storm_delay_ms)
    log_dir = settings.out / "logs" / f"{scenario.name}-r{round_no}"
    with (
        closing(redis.Redis.from_url(redis_url)) as control,
        closing(redis.Redis.from_url(_count_url(redis_url))) as counter,
    ):
        control.flushall()
        with (
            procs.serve(target, env, log_dir, settings.repo) as (base, children),
            httpx.Client(trust_env=False, timeout=10.0) as client,
        ):
            run = _Run(scenario, settings, redis_url, f"{scenario.name}-r{round_no}-{secrets.token_hex(4)}", base,
                       children, client, control, counter, record)  # fmt: skip
            run.measure()
    return record


@dataclass(slots=True)
class _Run:
    """The live pieces of one scenario run."""

    scenario: Scenario
    settings: Settings
    redis_url: str
    run_id: str
    base: str
    children: list[procs.Child]
    client: httpx.Client
    control: redis.Redis
    counter: redis.Redis  # the app's per-key execution counts (storms)
    record: dict[str, Any]

    def spec(self, phase: str, duration: float = 0, connections: int = 1) -> LoadSpec:
        # The replay key is the same in every phase (run_id + "-replay"); other modes get fresh keys per phase.
        suffix = "" if self.scenario.mode is Mode.REPLAY else f"-{phase}"
        return LoadSpec(
            url=self.base, mode=str(self.scenario.mode), run_id=self.run_id + suffix, duration=duration,
            connections=connections, threads=self.settings.threads, burst=self.settings.storm_burst,
        )  # fmt: skip

    def settle(self) -> None:
        """Let requests still in flight when a load phase stopped finish."""
        storm = self.scenario.mode is Mode.STORM
        time.sleep(SETTLE_SECONDS + (self.settings.storm_delay_ms / 1000 * 2 if storm else 0))

    def measure(self) -> None:
        """Prime, warm up, measure, count Redis commands; fills ``record``."""
        settings, record, mode = self.settings, self.record, self.scenario.mode
        url = self.base + PATH
        prime = self.spec("p")
        statuses = [_send(self.client, url, key_for(prime, 0, i)) for i in range(1, PRIME_REQUESTS + 1)]
        if not 200 <= statuses[0] < 300:
            raise RuntimeError(f"first request answered {statuses[0]}; see {self.children[0].log}")
        if settings.warmup > 0:
            load.run(settings.generator, self.spec("w", settings.warmup, settings.connections))
            self.settle()
        self.counter.delete(EXECUTIONS_HASH)
        if settings.quiet_timeout > 0:
            record["waited_for_quiet_s"] = round(procs.wait_quiet(settings.quiet_pct, settings.quiet_timeout), 1)

        before_exec = _dispatched(self.client, self.base)
        pids = {child.name: child.pid for child in self.children}
        pids["redis"] = int(self.control.info("server")["process_id"])
        cpu_before = {name: procs.cpu_seconds(pid) for name, pid in pids.items()}
        machine_before, own_before = procs.machine_cpu_seconds(), procs.own_cpu_seconds()
        started = time.monotonic()
        result = load.run(settings.generator, self.spec("m", settings.duration, settings.connections))
        elapsed = time.monotonic() - started
        machine_after, own_after = procs.machine_cpu_seconds(), procs.own_cpu_seconds()
        cpu_after = {name: procs.cpu_seconds(pid) for name, pid in pids.items()}
        ours = sum(cpu_after.values()) - sum(cpu_before.values()) + own_after - own_before
        # CPU that processes outside this run used meanwhile, in % of one CPU: a noise flag.
        record["foreign_cpu_pct"] = round(max(0.0, machine_after[0] - machine_before[0] - ours) * 100 / elapsed, 1)
        record["steal_cpu_pct"] = round((machine_after[1] - machine_before[1]) * 100 / elapsed, 1)
        # In-flight requests count as executions, and their Redis commands must not leak into MONITOR below.
        self.settle()
        if mode is Mode.STORM:
            record["storm"] = _storm_stats(self.counter.hgetall(EXECUTIONS_HASH))  # type: ignore[arg-type]
        executed = _dispatched(self.client, self.base) - before_exec

        record["load"] = result.to_dict()
        record["executed"] = executed
        record["executed_per_request"] = round(executed / result.requests, 4) if result.requests else None
        record["cpu_us_per_request"] = {
            name: round((cpu_after[name] - cpu_before[name]) * 1e6 / result.requests, 1) if result.requests else None
            for name in pids
        }
        if self.scenario.target.redis_commands and mode is not Mode.STORM and settings.monitor_requests > 0:
            self.count_redis_commands(url)

    def count_redis_commands(self, url: str) -> None:
        counted = self.spec("c")
        bad: list[int] = []

        def send_counted() -> int:
            for i in range(1, self.settings.monitor_requests + 1):
                code = _send(self.client, url, key_for(counted, 0, i))
                if not 200 <= code < 300:
                    bad.append(code)
            return self.settings.monitor_requests

        commands = monitor.count_commands(self.redis_url, send_counted)
        self.record["redis_commands"] = {**commands.to_dict(), "non_2xx": len(bad)}


def run_all(settings: Settings, redis_url: str, progress: Progress, results: list[dict[str, Any]]) -> None:
    """Append one record per scenario and round to ``results`` (so a Ctrl-C keeps what was done)."""
    total = settings.rounds * len(settings.scenarios)
    done = 0
    for round_no in range(1, settings.rounds + 1):
        for scenario in settings.scenarios:
            done += 1
            prefix = f"[{done}/{total}] round {round_no}/{settings.rounds} {scenario.name}"
            progress(f"{prefix}: running …")
            try:
                record = run_one(scenario, round_no, redis_url, settings)
            except Exception as exc:  # one broken scenario must not lose the others
                record = {"scenario": scenario.name, "target": scenario.target.name, "mode": str(scenario.mode),
                          "round": round_no, "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
                progress(f"{prefix}: FAILED {record['error']}")
            else:
                progress(f"{prefix}: {describe(record)}")
            results.append(record)


def describe(record: dict[str, Any]) -> str:
    run = record["load"]
    parts = [
        f"{run['rps']:,.0f} rps",
        f"p50 {run['p50_ms']:.2f} ms",
        f"p99 {run['p99_ms']:.2f} ms",
        f"non-2xx {run['non_2xx']}",
        f"5xx {run['status'].get('5xx', 0)}",
        f"executed/request {record['executed_per_request']}",
    ]
    if "redis_commands" in record:
        parts.append(f"{record['redis_commands']['per_request']:g} Redis cmds/request")
    if "storm" in record:
        storm = record["storm"]
        parts.append(f"{storm['keys']} keys, {storm['duplicate_executions']} duplicate executions")
    return ", ".join(parts)
