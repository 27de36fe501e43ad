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

from benchmarks import charts, envinfo, grid, load, procs, report, scale_report
from benchmarks.grid import Group, Mode, Server
from benchmarks.runner import Settings, plan, rounds_of, run_all
from benchmarks.verdicts import NOKEY_MIN_ROUNDS

REPO = Path(__file__).resolve().parent.parent
# RESULTS.md, results.json and the PNGs are committed artefacts next to the harness; logs/ is ignored.
DEFAULT_OUT = REPO / "benchmarks"
QUICK_OUT = DEFAULT_OUT / "logs" / "quick"  # a smoke run must not replace the committed artefacts
DEFAULTS = {"rounds": 3, "nokey_rounds": NOKEY_MIN_ROUNDS, "duration": 6, "proxy_duration": 5, "warmup": 1,
            "monitor_requests": 200, "wake_trials": 20, "soak_requests": 200_000, "quiet_timeout": 10.0,
            "quiet_budget": 120.0}  # fmt: skip
QUICK = {"rounds": 1, "nokey_rounds": 1, "duration": 1, "proxy_duration": 1, "warmup": 0, "monitor_requests": 20,
         "wake_trials": 3, "soak_requests": 5_000, "quiet_timeout": 0.0, "quiet_budget": 0.0}  # fmt: skip
# For the duration estimate (seconds, measured on a 2-core VM): starting and stopping the processes and
# the MONITOR phase of one scenario, and the slowest rate the soak is expected to run at.
START_STOP_S = {"app": 1.5, "proxy": 2.0, "nginx": 0.3, "per_extra_worker": 1.0}
MONITOR_S_PER_REQUEST = 0.004
WAKE_S_PER_TRIAL = 0.2
SOAK_EXPECTED_RPS = 3_000
SOAK_SLOWEST_RPS = 500  # bounds the soak: it stops after soak_requests / this many seconds at the latest


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure what idempotency layers cost against the bare app (SPEC.md §7).",
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1 round, 1 s per scenario, no warm-up")
    parser.add_argument("--rounds", type=int, help="rounds, alternating A B A B (default 3; quick 1)")
    parser.add_argument("--nokey-rounds", type=int, help="rounds of the middleware's no-key scenarios and bare, "
                        f"at least --rounds (default {NOKEY_MIN_ROUNDS}, SPEC §7; quick 1)")  # fmt: skip
    parser.add_argument("--duration", type=int, help="seconds of measured load per scenario (default 6; quick 1)")
    parser.add_argument("--proxy-duration", type=int, help="... in the proxy group (default 5; quick 1)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up load before each (default 1; quick 0)")
    parser.add_argument("--connections", "-c", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument("--threads", "-t", type=int, default=1, help="load generator threads (default 1)")
    parser.add_argument("--scenarios", help="comma-separated names, target names or fnmatch patterns "
                        "(default: every enabled target); see --list")  # fmt: skip
    parser.add_argument("--only", metavar="GROUPS", help="comma-separated groups: " + ", ".join(Group) + "; "
                        "their records replace those groups' in an existing OUT/results.json")  # fmt: skip
    parser.add_argument("--proxy-args", default="", metavar="ARGS", help="more arguments for every relay-idem "
                        "proxy started, e.g. '--upstream-client aiohttp' to compare upstream clients")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--render", type=Path, metavar="DIR", nargs="?", const=DEFAULT_OUT,
                        help="only rewrite DIR/RESULTS.md and the charts from DIR/results.json, and README.md's "
                        "benchmark table when DIR is benchmarks/ (the default)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="output directory (default benchmarks/; quick benchmarks/logs/quick/)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="wrk, the built-in asyncio generator, or wrk when installed (default)")  # fmt: skip
    parser.add_argument("--storm-burst", type=int, help="storm: requests sharing one key (default: --connections)")
    parser.add_argument("--storm-delay-ms", type=float, default=20.0, help="storm: app work per message (default 20)")
    parser.add_argument("--monitor-requests", type=int, help="requests counted under MONITOR (default 200; quick 20)")
    parser.add_argument("--wake-trials", type=int, help="wake: trials of a held request and 3 waiting repeats "
                        "(default 20; quick 3)")  # fmt: skip
    parser.add_argument("--soak-requests", type=int, help="unique-key requests of the proxy soak "
                        "(default 200000; quick 5000)")  # fmt: skip
    parser.add_argument("--quiet-timeout", type=float, help="before each measurement, wait up to this many seconds "
                        "for other processes to go quiet (default 10; quick 0)")  # fmt: skip
    parser.add_argument("--quiet-budget", type=float, help="... and at most this many seconds in the whole run "
                        "(default 120; quick 0)")  # fmt: skip
    parser.add_argument("--quiet-pct", type=float, default=25.0,
                        help="'quiet' = other processes use less than this %% of one CPU (default 25)")  # fmt: skip
    args = parser.parse_args(argv)
    for name in (
        "rounds",
        "nokey_rounds",
        "duration",
        "proxy_duration",
        "connections",
        "threads",
        "wake_trials",
        "soak_requests",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        args.selected = grid.select(args.scenarios, args.only)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def write_reports(out: Path, document: dict[str, Any], summaries: list[dict[str, Any]]) -> list[Path]:
    """RESULTS.md and the charts in ``out``; README.md's benchmark table too when ``out`` is benchmarks/."""
    pictures = charts.write_charts(summaries, out)
    text = report.markdown(document, summaries, charts.chart_names(summaries), out)
    (out / "RESULTS.md").write_text(text)
    written = [out / "RESULTS.md", *pictures]
    if out.resolve() == DEFAULT_OUT.resolve():
        readme = REPO / "README.md"
        readme.write_text(report.rewrite_readme(readme.read_text(), document, summaries))
        written.append(readme)
        scale = scale_report.load()
        if scale:
            (scale_report.HERE / "RESULTS.md").write_text(scale_report.markdown(scale))
            written.append(scale_report.HERE / "RESULTS.md")
    return written


def _start_stop(scenario: grid.Scenario) -> float:
    target, extra = scenario.target, scenario.workers - 1
    if target.fast_upstream:
        front = {Server.NGINX: "nginx", Server.RELAY_IDEM: "proxy", Server.UVICORN: "app"}[target.server]
        return START_STOP_S["nginx"] + START_STOP_S[front] + START_STOP_S["per_extra_worker"] * extra
    start_stop = START_STOP_S["app"] + (START_STOP_S["proxy"] if target.proxy else 0)
    return start_stop + START_STOP_S["per_extra_worker"] * extra * (2 if target.proxy else 1)


def estimate(settings: Settings) -> tuple[float, float]:
    """(expected, longest) seconds the run takes; the longest counts every quiet wait and a slow soak."""
    expected = longest = 0.0
    for scenario in settings.scenarios:
        if scenario.mode is Mode.WAKE:
            expected += settings.rounds * (1.0 + settings.wake_trials * WAKE_S_PER_TRIAL)
            continue
        fixed = _start_stop(scenario) + settings.warmup + 1.0  # priming, settling, a first quiet-check sample
        if scenario.mode is Mode.SOAK:
            expected += fixed + settings.soak_requests / SOAK_EXPECTED_RPS
            longest += fixed + settings.soak_limit
            continue
        monitor = 0.0
        if scenario.target.redis_commands and scenario.mode is not Mode.STORM:
            monitor = settings.monitor_requests * MONITOR_S_PER_REQUEST * (2 if scenario.target.proxy else 1)
        duration = settings.proxy_duration if scenario.group is Group.PROXY else settings.duration
        expected += rounds_of(scenario, settings) * (fixed + duration + monitor)
    longest += expected - sum(  # the soaks at their expected rate are replaced by their limit above
        settings.soak_requests / SOAK_EXPECTED_RPS for s in settings.scenarios if s.mode is Mode.SOAK
    )
    longest += min(settings.quiet_budget, settings.quiet_timeout * len(plan(settings)))
    return expected, longest


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def render(out: Path) -> int:
    """Re-render the reports of an earlier run (e.g. after changing the writer)."""
    document, summaries = report.load(out)
    document["summary"] = summaries
    report.write_json(out / "results.json", document)
    written = write_reports(out, document, summaries)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def merge(path: Path, groups: list[str], part: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The results.json at ``path`` with ``groups``' records replaced by ``records`` (``--only``)."""
    document: dict[str, Any] = {"runs": [], "parts": []}
    if path.is_file():
        document = json.loads(path.read_text())
    group_of = {s.name: str(s.group) for s in grid.all_scenarios()}
    kept = [r for r in document["runs"] if group_of.get(r["scenario"]) not in groups and r["scenario"] in group_of]
    parts = [] if not document["runs"] else report.parts_of(document)
    parts = [{**p, "groups": [g for g in p["groups"] if g not in groups]} for p in parts]
    parts = [p for p in parts if p["groups"]] + [part]
    return {"environment": part["environment"], "settings": part["settings"], "parts": parts,
            "runs": kept + records}  # fmt: skip


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
        nokey_rounds=option("nokey_rounds"),
        duration=option("duration"),
        proxy_duration=option("proxy_duration"),
        warmup=option("warmup"),
        connections=args.connections,
        threads=args.threads,
        generator=load.pick(args.loadgen),
        storm_burst=args.storm_burst or args.connections,
        storm_delay_ms=args.storm_delay_ms,
        monitor_requests=option("monitor_requests"),
        wake_trials=option("wake_trials"),
        soak_requests=soak_requests,
        soak_limit=max(30, math.ceil(soak_requests / SOAK_SLOWEST_RPS)),
        quiet_pct=args.quiet_pct,
        quiet_timeout=option("quiet_timeout"),
        quiet_budget=option("quiet_budget"),
        out=out,
        repo=REPO,
        proxy_args=tuple(shlex.split(args.proxy_args)),
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
    steps = len(plan(settings)) - soaks
    progress(f"{len(settings.scenarios) - soaks} scenario(s), {steps} runs in {settings.rounds} round(s)"
             + (f" ({max(settings.rounds, settings.nokey_rounds)} for the no-key scenarios)"
                if settings.nokey_rounds > settings.rounds else "")
             + (f" + {soaks} soak(s) of {settings.soak_requests:,} requests" if soaks else "")
             + f", {settings.generator}, -c{settings.connections} -d{settings.duration}s "
             f"(proxy group {settings.proxy_duration}s), output in {out}")  # fmt: skip
    progress(f"expected duration: about {_minutes(expected)} (at most {_minutes(longest)}: waiting for a quiet "
             f"machine, a slow soak)")  # fmt: skip
    records: list[dict[str, Any]] = []
    interrupted = False
    try:
        if any(s.target.fast_upstream for s in settings.scenarios):
            procs.ensure_nginx(progress)
        with procs.redis_server(out / "logs") as (redis_url, _):
            progress(f"redis-server {environment['versions']['redis-server']} on {redis_url}")  # type: ignore[index]
            run_all(settings, redis_url, progress, records)
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: children stopped, writing what was measured")
    except procs.ProcessError as exc:
        progress(f"error: {exc}")
        return 1

    groups = sorted({str(s.group) for s in settings.scenarios})
    part = {"groups": groups, "environment": environment, "settings": settings_json}
    if args.only:
        document = merge(out / "results.json", groups, part, records)
    else:
        document = {"environment": environment, "settings": settings_json, "parts": [part], "runs": records}
    summaries = report.summarise_document(document["runs"])
    document = {**document, "summary": summaries}
    report.write_json(out / "results.json", document)
    written = [out / "results.json", *write_reports(out, document, summaries)]
    progress("wrote " + ", ".join(str(path) for path in written))
    if interrupted:
        return 130
    return 1 if any("error" in r for r in records) else 0
