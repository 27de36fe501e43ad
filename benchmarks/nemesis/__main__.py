"""``python -m benchmarks.nemesis --minutes N [--seed S]``: faults in combination, under load, judged.

Runs each configuration of ``benchmarks/nemesis/system.py`` for its share of ``--minutes`` with
real processes: the history-recording client (``client.py``) sends keyed requests through both
proxies while the nemesis (``faults.py``) injects faults at random times, several at once. Then
the faults heal, the traffic drains, and the checker (``checker.py``) judges the whole history.
Prints every violation, then the table last; exits 0 only when no invariant is violated.
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from benchmarks.nemesis.checker import Verdict, check, read_executions, table
from benchmarks.nemesis.client import RETRY_BUDGET, Attempt, Client
from benchmarks.nemesis.faults import Fault, Nemesis
from benchmarks.nemesis.system import CONFIGURATIONS, LOCK_TTL, System, running

# How long a record may stay in progress once traffic and faults have stopped: the lease, plus
# the window in which a proxy keeps retrying an outcome write (SPEC §3.8, complete_retry).
DRAIN_LIMIT = LOCK_TTL + 30.0 + 5.0


def in_progress(system: System) -> list[str]:
    """Records that are still claimed and not completed (a hash with the owner token field ``t``)."""
    primary = system.primary()
    with primary.client() as connection:
        names = [name.decode() for name in connection.scan_iter(match=f"{system.prefix}:*", count=1000)]
        return [name for name in names if connection.type(name) == b"hash" and connection.hexists(name, "t")]


def drain(system: System) -> list[str]:
    """Poll until no record is in progress; those left after ``DRAIN_LIMIT`` are stuck."""
    deadline = time.monotonic() + DRAIN_LIMIT
    while True:
        try:
            left = in_progress(system)
        except redis.RedisError as exc:
            left = [f"(Redis did not answer: {exc})"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def save_history(history: list[Attempt], path: Path) -> None:
    """Every attempt and answer, one JSON object a line (bodies as latin-1 text), for a later look."""
    with path.open("w") as out:
        for attempt in history:
            fields = dataclasses.asdict(attempt) | {"body": attempt.body.decode("latin-1")}
            out.write(json.dumps(fields) + "\n")


def run_configuration(
    configuration: str,
    seconds: float,
    seed: int,
    concurrency: int,
    retry_budget: float,
    directory: Path,
    only: str | None = None,
) -> tuple[Verdict, Client, list[Fault], float]:
    started = time.monotonic()
    print(f"nemesis: {configuration}: starting Redis, the upstream and 2 proxies", file=sys.stderr, flush=True)
    with running(configuration, directory / configuration) as system:
        client = Client([proxy.url for proxy in system.proxies], seed, concurrency, retry_budget)
        nemesis = Nemesis(system, random.Random(seed + 1), only)
        faults = threading.Thread(target=nemesis.run, args=(seconds,), name="nemesis", daemon=True)
        print(f"nemesis: {configuration}: traffic and faults for {seconds:.0f} s", file=sys.stderr, flush=True)
        faults.start()
        asyncio.run(client.run(seconds))
        nemesis.stopping.set()
        faults.join()
        stuck = drain(system)
        unhealthy = system.healthy(timeout=30)
        ports = {port: index for index, port in enumerate(system.upstream.ports)}
        executions = read_executions(system.executions, ports)
        with system.logs.lock:
            logs = list(system.logs.lines)
        history = client.history
        save_history(history, directory / configuration / "history.jsonl")
        verdict = check(configuration, system.min_replicas, history, executions, logs, nemesis.faults, stuck, unhealthy)
    return verdict, client, nemesis.faults, (time.monotonic() - started) / 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nemesis", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, required=True, help="traffic and faults, over all configurations")
    parser.add_argument("--seed", type=int, default=None, help="seed of the faults and the client (default: random)")
    parser.add_argument("--configuration", choices=(*CONFIGURATIONS, "both"), default="both")
    parser.add_argument("--concurrency", type=int, default=16, help="logical requests in flight at once")
    parser.add_argument("--retry-budget", type=float, default=RETRY_BUDGET, help="seconds each request is retried")
    parser.add_argument("--dir", type=Path, default=None, help="where logs and the execution record go")
    parser.add_argument("--faults", default=None, help="only the fault kinds whose name contains this, e.g. redis")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="relay-idem-nemesis-"))
    configurations = CONFIGURATIONS if args.configuration == "both" else (args.configuration,)
    seconds = args.minutes * 60 / len(configurations)
    results = [
        run_configuration(name, seconds, seed, args.concurrency, args.retry_budget, directory, args.faults)
        for name in configurations
    ]
    verdicts = [verdict for verdict, _, _, _ in results]
    for verdict in verdicts:
        for invariant, found in verdict.violations.items():
            for violation in found[:20]:
                print(f"VIOLATION [{verdict.configuration}] {invariant}: {violation}")
            if len(found) > 20:
                print(f"VIOLATION [{verdict.configuration}] {invariant}: ... and {len(found) - 20} more")
    command = f"nemesis --minutes {args.minutes:g} --seed {seed} --retry-budget {args.retry_budget:g}"
    print(f"\n{command}; logs and executions in {directory}\n")
    print(table(verdicts, [r[1] for r in results], [r[2] for r in results], [r[3] for r in results]))
    return 0 if all(verdict.ok for verdict in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
