"""``python -m benchmarks``: parse flags, start Redis, run the grid, write the reports."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import charts, envinfo, grid, load, procs, report
from benchmarks.grid import Mode
from benchmarks.runner import Settings, run_all

REPO = Path(__file__).resolve().parent.parent
# RESULTS.md, results.json and the PNGs are committed artefacts next to the harness; logs/ is ignored.
DEFAULT_OUT = REPO / "benchmarks"
QUICK_OUT = DEFAULT_OUT / "logs" / "quick"  # a smoke run must not replace the committed artefacts
DEFAULTS = {"rounds": 3, "duration": 8, "warmup": 1, "monitor_requests": 200, "soak_requests": 200_000,
            "quiet_timeout": 10.0, "quiet_budget": 120.0}  # fmt: skip
QUICK = {"rounds": 1, "duration": 1, "warmup": 0, "monitor_requests": 20, "soak_requests": 5_000,
         "quiet_timeout": 0.0, "quiet_budget": 0.0}  # fmt: skip
# For the duration estimate (seconds, measured on a 2-core VM): starting and stopping the processes and
# the MONITOR phase of one scenario, and the slowest rate the soak is expected to run at.
START_STOP_S = {"app": 1.5, "proxy": 2.0, "per_extra_worker": 1.0}
MONITOR_S_PER_REQUEST = 0.004
SOAK_EXPECTED_RPS = 3_000
SOAK_SLOWEST_RPS = 500  # bounds the soak: it stops after soak_requests / this many seconds at the latest


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure what idempotency layers cost against the bare app (SPEC.md §7).",
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1 round, 1 s per scenario, no warm-up")
    parser.add_argument("--rounds", type=int, help="rounds, alternating A B A B (default 3; quick 1)")
    parser.add_argument("--duration", type=int, help="seconds of measured load per scenario (default 8; quick 1)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up load before each (default 1; quick 0)")
    parser.add_argument("--connections", "-c", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument("--threads", "-t", type=int, default=1, help="load generator threads (default 1)")
    parser.add_argument("--scenarios", help="comma-separated names, target names or fnmatch patterns "
                        "(default: every enabled target); see --list")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--render", type=Path, metavar="DIR", nargs="?", const=DEFAULT_OUT,
                        help="only rewrite DIR/RESULTS.md and the charts from DIR/results.json "
                        "(DIR: benchmarks/)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="output directory (default benchmarks/; quick benchmarks/logs/quick/)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="wrk, the built-in asyncio generator, or wrk when installed (default)")  # fmt: skip
    parser.add_argument("--storm-burst", type=int, help="storm: requests sharing one key (default: --connections)")
    parser.add_argument("--storm-delay-ms", type=float, default=20.0, help="storm: app work per message (default 20)")
    parser.add_argument("--monitor-requests", type=int, help="requests counted under MONITOR (default 200; quick 20)")
    parser.add_argument("--soak-requests", type=int, help="unique-key requests of the proxy soak "
                        "(default 200000; quick 5000)")  # fmt: skip
    parser.add_argument("--quiet-timeout", type=float, help="before each measurement, wait up to this many seconds "
                        "for other processes to go quiet (default 10; quick 0)")  # fmt: skip
    parser.add_argument("--quiet-budget", type=float, help="... and at most this many seconds in the whole run "
                        "(default 120; quick 0)")  # fmt: skip
    parser.add_argument("--quiet-pct", type=float, default=25.0,
                        help="'quiet' = other processes use less than this %% of one CPU (default 25)")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("rounds", "duration", "connections", "threads", "soak_requests"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        args.selected = grid.select(args.scenarios)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def write_reports(out: Path, environment: dict[str, Any], settings: dict[str, Any], records: list[dict[str, Any]],
                  summaries: list[dict[str, Any]]) -> list[Path]:  # fmt: skip
    pictures = charts.write_charts(summaries, out)
    text = report.markdown(environment, settings, summaries, records, [p.name for p in pictures], out)
    (out / "RESULTS.md").write_text(text)
    return [out / "RESULTS.md", *pictures]


def estimate(settings: Settings) -> tuple[float, float]:
    """(expected, longest) seconds the run takes; the longest counts every quiet wait and a slow soak."""
    expected = longest = 0.0
    for scenario in settings.scenarios:
        start_stop = START_STOP_S["app"] + (START_STOP_S["proxy"] if scenario.target.proxy else 0)
        start_stop += START_STOP_S["per_extra_worker"] * (scenario.workers - 1) * (2 if scenario.target.proxy else 1)
        fixed = start_stop + settings.warmup + 1.0  # priming, settling, a first quiet-check sample
        if scenario.mode is Mode.SOAK:
            expected += fixed + settings.soak_requests / SOAK_EXPECTED_RPS
            longest += fixed + settings.soak_limit
            continue
        monitor = 0.0
        if scenario.target.redis_commands and scenario.mode is not Mode.STORM:
            monitor = settings.monitor_requests * MONITOR_S_PER_REQUEST * (2 if scenario.target.proxy else 1)
        expected += settings.rounds * (fixed + settings.duration + monitor)
        longest += settings.rounds * (fixed + settings.duration + monitor)
    longest += min(settings.quiet_budget, settings.quiet_timeout * settings.rounds * len(settings.scenarios))
    return expected, longest


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def render(out: Path) -> int:
    """Re-render the reports of an earlier run (e.g. after changing the writer)."""
    document = json.loads((out / "results.json").read_text())
    ran = {record["scenario"] for record in document["runs"]}  # an older run's grid may have been smaller
    scenarios = [s for s in grid.select(",".join(document["settings"]["scenarios"])) if s.name in ran]
    summaries = report.summarise(scenarios, document["runs"])
    written = write_reports(out, document["environment"], document["settings"], document["runs"], summaries)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every context manager, stopping the children


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list:
        for scenario in grid.all_scenarios():
            state = "" if scenario.target.enabled else "  (off by default)"
            print(f"{scenario.name:32} {scenario.description}{state}")
        return 0
    if args.render is not None:
        return render(args.render)
    if not args.selected:
        print("no scenario selected", file=sys.stderr)
        return 2

    quick = args.quick
    out: Path = args.out or (QUICK_OUT if quick else DEFAULT_OUT)
    defaults = QUICK if quick else DEFAULTS

    def option(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    soak_requests = int(option("soak_requests"))
    settings = Settings(
        scenarios=tuple(args.selected),
        rounds=option("rounds"),
        duration=option("duration"),
        warmup=option("warmup"),
        connections=args.connections,
        threads=args.threads,
        generator=load.pick(args.loadgen),
        storm_burst=args.storm_burst or args.connections,
        storm_delay_ms=args.storm_delay_ms,
        monitor_requests=option("monitor_requests"),
        soak_requests=soak_requests,
        soak_limit=max(30, math.ceil(soak_requests / SOAK_SLOWEST_RPS)),
        quiet_pct=args.quiet_pct,
        quiet_timeout=option("quiet_timeout"),
        quiet_budget=option("quiet_budget"),
        out=out,
        repo=REPO,
    )
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    command = "python -m benchmarks " + shlex.join(argv) if argv else "python -m benchmarks"
    environment = envinfo.collect(REPO, command.strip())
    settings_json: dict[str, Any] = {
        k: v for k, v in asdict(settings).items() if k not in ("scenarios", "out", "repo")
    } | {"scenarios": [s.name for s in settings.scenarios], "quick": quick, "out_dir": str(out)}

    def progress(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    soaks = sum(1 for scenario in settings.scenarios if scenario.mode is Mode.SOAK)
    expected, longest = estimate(settings)
    progress(f"{len(settings.scenarios) - soaks} scenario(s) x {settings.rounds} round(s)"
             + (f" + {soaks} soak(s) of {settings.soak_requests:,} requests" if soaks else "")
             + f", {settings.generator}, -c{settings.connections} -d{settings.duration}s, output in {out}")  # fmt: skip
    progress(f"expected duration: about {_minutes(expected)} (at most {_minutes(longest)}: waiting for a quiet "
             f"machine, a slow soak)")  # fmt: skip
    records: list[dict[str, Any]] = []
    interrupted = False
    try:
        with procs.redis_server(out / "logs") as (redis_url, _):
            progress(f"redis-server {environment['versions']['redis-server']} on {redis_url}")  # type: ignore[index]
            run_all(settings, redis_url, progress, records)
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: children stopped, writing what was measured")
    except procs.ProcessError as exc:
        progress(f"error: {exc}")
        return 1

    summaries = report.summarise(list(settings.scenarios), records)
    report.write_json(out / "results.json", environment, settings_json, records, summaries)
    written = [out / "results.json", *write_reports(out, environment, settings_json, records, summaries)]
    progress("wrote " + ", ".join(str(path) for path in written))
    if interrupted:
        return 130
    return 1 if any("error" in r for r in records) else 0
