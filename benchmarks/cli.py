"""``python -m benchmarks``: parse flags, start Redis, run the grid, write the reports."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import charts, envinfo, grid, load, procs, report
from benchmarks.runner import Settings, run_all

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "out"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure what idempotency layers cost against the bare app (SPEC.md §7).",
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1 round, 1 s per scenario, no warm-up")
    parser.add_argument("--rounds", type=int, help="rounds, alternating A B A B (default 3; quick 1)")
    parser.add_argument("--duration", type=int, help="seconds of measured load per scenario (default 10; quick 1)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up load before each (default 1; quick 0)")
    parser.add_argument("--connections", "-c", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument("--threads", "-t", type=int, default=1, help="load generator threads (default 1)")
    parser.add_argument("--scenarios", help="comma-separated names, target names or fnmatch patterns "
                        "(default: every enabled target); see --list")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--render", type=Path, metavar="DIR",
                        help="only rewrite DIR/RESULTS.md and charts from DIR/results.json")  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="wrk, the built-in asyncio generator, or wrk when installed (default)")  # fmt: skip
    parser.add_argument("--storm-burst", type=int, help="storm: requests sharing one key (default: --connections)")
    parser.add_argument("--storm-delay-ms", type=float, default=20.0, help="storm: app work per message (default 20)")
    parser.add_argument("--monitor-requests", type=int, help="requests counted under MONITOR (default 200; quick 20)")
    parser.add_argument("--quiet-timeout", type=float, help="before each measurement, wait up to this many seconds "
                        "for other processes to go quiet (default 60; quick 0)")  # fmt: skip
    parser.add_argument("--quiet-pct", type=float, default=25.0,
                        help="'quiet' = other processes use less than this %% of one CPU (default 25)")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("rounds", "duration", "connections", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    try:
        args.selected = grid.select(args.scenarios)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def write_reports(out: Path, environment: dict[str, Any], settings: dict[str, Any], records: list[dict[str, Any]],
                  summaries: list[dict[str, Any]]) -> list[Path]:  # fmt: skip
    (out / "RESULTS.md").write_text(report.markdown(environment, settings, summaries, records))
    return [out / "RESULTS.md", *charts.write_charts(summaries, out)]


def render(out: Path) -> int:
    """Re-render the reports of an earlier run (e.g. after changing the writer)."""
    document = json.loads((out / "results.json").read_text())
    scenarios = grid.select(",".join(document["settings"]["scenarios"]))
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
            print(f"{scenario.name:32} {scenario.mode.description}{state}")
        return 0
    if args.render is not None:
        return render(args.render)
    if not args.selected:
        print("no scenario selected", file=sys.stderr)
        return 2

    quick = args.quick
    out: Path = args.out
    settings = Settings(
        scenarios=tuple(args.selected),
        rounds=args.rounds or (1 if quick else 3),
        duration=args.duration or (1 if quick else 10),
        warmup=args.warmup if args.warmup is not None else (0 if quick else 1),
        connections=args.connections,
        threads=args.threads,
        generator=load.pick(args.loadgen),
        storm_burst=args.storm_burst or args.connections,
        storm_delay_ms=args.storm_delay_ms,
        monitor_requests=args.monitor_requests if args.monitor_requests is not None else (20 if quick else 200),
        quiet_pct=args.quiet_pct,
        quiet_timeout=args.quiet_timeout if args.quiet_timeout is not None else (0 if quick else 60),
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

    progress(f"{len(settings.scenarios)} scenario(s) x {settings.rounds} round(s), {settings.generator}, "
             f"-c{settings.connections} -d{settings.duration}s, output in {out}")  # fmt: skip
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
