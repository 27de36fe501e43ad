"""Summaries of the raw records: medians over rounds, min-max, ratios against bare in the same round."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.grid import Mode, Scenario

Record = dict[str, Any]


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(scenarios: list[Scenario], records: list[Record]) -> list[dict[str, Any]]:
    """One summary per scenario, in grid order."""
    ok = [r for r in records if "error" not in r]
    rps: dict[tuple[str, int], float] = {(r["scenario"], r["round"]): r["load"]["rps"] for r in ok}
    by_scenario: dict[str, list[Record]] = defaultdict(list)
    for record in ok:
        by_scenario[record["scenario"]].append(record)
    errors = defaultdict(list)
    for record in records:
        if "error" in record:
            errors[record["scenario"]].append(f"round {record['round']}: {record['error']}")

    summaries = []
    for scenario in scenarios:
        runs = by_scenario.get(scenario.name, [])
        ratios = [
            r["load"]["rps"] / rps[(scenario.baseline, r["round"])]
            for r in runs
            if scenario.baseline and rps.get((scenario.baseline, r["round"]))
        ]
        commands = [r["redis_commands"]["per_request"] for r in runs if "redis_commands" in r]
        storms = [r["storm"] for r in runs if "storm" in r]
        summaries.append(
            {
                "scenario": scenario.name,
                "target": scenario.target.name,
                "mode": str(scenario.mode),
                "store": scenario.target.store,
                "baseline": scenario.baseline,
                "redis_commands_counted": scenario.target.redis_commands,
                "rounds": len(runs),
                "rps": _spread([r["load"]["rps"] for r in runs]),
                "ratio": _spread(ratios),
                "p50_ms": _spread([r["load"]["p50_ms"] for r in runs]),
                "p99_ms": _spread([r["load"]["p99_ms"] for r in runs]),
                "requests": sum(r["load"]["requests"] for r in runs),
                "non_2xx": sum(r["load"]["non_2xx"] for r in runs),
                "status": _sum_dicts([r["load"]["status"] for r in runs]),
                "socket_errors": sum(sum(r["load"]["errors"].values()) for r in runs),
                "executed_per_request": _spread(
                    [r["executed_per_request"] for r in runs if r["executed_per_request"] is not None]
                ),
                "redis_commands_per_request": _spread(commands),
                "redis_commands_by_name": runs[-1]["redis_commands"]["by_command_per_request"]
                if runs and "redis_commands" in runs[-1]
                else None,
                # Everything that serves HTTP (the app, and the proxy in front of it), without Redis.
                "server_cpu_us_per_request": _spread(
                    [
                        sum(v for k, v in r["cpu_us_per_request"].items() if k != "redis")
                        for r in runs
                        if None not in r["cpu_us_per_request"].values()
                    ]
                ),
                "storm": _sum_storms(storms) if storms else None,
                "errors": errors.get(scenario.name, []),
            }
        )
    return summaries


def _sum_dicts(dicts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for d in dicts:
        for key, value in d.items():
            total[key] += value
    return dict(total)


def _sum_storms(storms: list[dict[str, int]]) -> dict[str, int]:
    total = _sum_dicts([{k: v for k, v in s.items() if k != "max_executions_per_key"} for s in storms])
    total["max_executions_per_key"] = max(s["max_executions_per_key"] for s in storms)
    return total


def write_json(path: Path, environment: dict[str, Any], settings: dict[str, Any], records: list[Record],
               summaries: list[dict[str, Any]]) -> None:  # fmt: skip
    document = {"environment": environment, "settings": settings, "summary": summaries, "runs": records}
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def _fmt_spread(spread: dict[str, float] | None, fmt: str, unit: str = "") -> str:
    if spread is None:
        return "-"
    median = format(spread["median"], fmt) + unit
    if spread["min"] == spread["max"]:
        return median
    return f"{median} ({format(spread['min'], fmt)}-{format(spread['max'], fmt)})"


def _cell(summary: dict[str, Any]) -> str:
    """A pivot-table cell: bare gets its rps, everything else its ratio and Redis commands."""
    if summary["rps"] is None:
        return "failed"
    if summary["baseline"] is None:
        return f"{summary['rps']['median']:,.0f} rps"
    if summary["storm"] is not None:  # throughput means little here: 409s are cheap, waiting is slow
        storm, requests = summary["storm"], summary["requests"] or 1
        parts = [
            f"{storm['duplicate_executions']} duplicate executions",
            f"409 {summary['status'].get('409', 0) / requests:.0%}",
        ]
        if summary["status"].get("5xx"):
            parts.append(f"**{summary['status']['5xx']} x 5xx**")
        return " · ".join(parts)
    parts = [_fmt_spread(summary["ratio"], ".2f", "x")]
    commands = summary["redis_commands_per_request"]
    if commands is not None and summary["store"] == "redis":
        parts.append(f"{commands['median']:g} cmds")
    executed = summary["executed_per_request"]
    if summary["mode"] == Mode.NOKEY and (executed is None or executed["median"] < 0.99):
        parts.append(f"executed {executed['median'] if executed else 0:.0%}")
    if summary["status"].get("5xx"):
        parts.append(f"**{summary['status']['5xx']} x 5xx**")
    return " · ".join(parts)


def _commands(summary: dict[str, Any]) -> str:
    if not summary["redis_commands_counted"]:
        return "n/a"  # the layer keeps no state in Redis
    return _fmt_spread(summary["redis_commands_per_request"], "g")


def markdown(
    environment: dict[str, Any], settings: dict[str, Any], summaries: list[dict[str, Any]], records: list[Record]
) -> str:
    machine, versions = environment["machine"], environment["versions"]
    foreign = [r["foreign_cpu_pct"] for r in records if "foreign_cpu_pct" in r]
    steal = [r["steal_cpu_pct"] for r in records if "steal_cpu_pct" in r]
    load_note = (
        f"; CPU used by other processes while measuring: median {statistics.median(foreign):.0f} %, "
        f"max {max(foreign):.0f} % of one CPU (steal: max {max(steal):.0f} %)"
        if foreign
        else ""
    )
    lines = [
        "# Benchmark results",
        "",
        f"- Date: {environment['date']} (git {environment['git']})",
        f"- Machine: {machine['nproc']} CPUs (nproc), {machine['cpu_model']}, {machine['memory_gib']} GiB RAM, "
        f"Linux {machine['kernel']}{load_note}",
        "- Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        f"- Load: {settings['generator']}, {settings['threads']} thread(s), {settings['connections']} connections, "
        f"{settings['duration']} s per scenario after {settings['warmup']} s warm-up; {settings['rounds']} round(s) "
        f"alternating A B A B, each scenario in a fresh uvicorn process (1 worker, uvloop, httptools) on a fresh "
        f"redis-server; storm: {settings['storm_burst']} concurrent requests per key against an app that takes "
        f"{settings['storm_delay_ms']:g} ms",
        f"- Command: `{environment['command']}`",
        "",
        "Ratios are medians of per-round throughput divided by the bare app's in the same round, with min-max over "
        "rounds; storms are judged by duplicate executions and status codes (throughput in the details). "
        "`cmds` = Redis commands the client sent per request (MONITOR, script-internal commands excluded). "
        "Server CPU = CPU time of the app (and the proxy in front of it) per request, Redis excluded.",
        "",
    ]
    targets = list(dict.fromkeys(s["target"] for s in summaries))
    modes = [str(mode) for mode in Mode if any(s["mode"] == mode for s in summaries)]
    cells = {(s["target"], s["mode"]): s for s in summaries}
    lines += ["## Summary", "", "| scenario | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for mode in modes:
        row = [Mode(mode).description]
        for target in targets:
            summary = cells.get((target, mode))
            if summary is None and target == "bare" and mode != Mode.STORM:
                summary = cells.get(("bare", str(Mode.NOKEY)))
            row.append(_cell(summary) if summary else "")
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "## Details", "",
              "| scenario | store | rps median (min-max) | ratio | p50 ms | p99 ms | requests | non-2xx | 409 | 5xx "
              "| executed/req | Redis cmds/req | server CPU µs/req |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summaries:
        lines.append(
            "| " + " | ".join([
                s["scenario"], s["store"], _fmt_spread(s["rps"], ",.0f"),
                _fmt_spread(None if s["storm"] else s["ratio"], ".2f", "x"),
                _fmt_spread(s["p50_ms"], ".2f"), _fmt_spread(s["p99_ms"], ".2f"), f"{s['requests']:,}",
                str(s["non_2xx"]), str(s["status"].get("409", 0)), str(s["status"].get("5xx", 0)),
                _fmt_spread(s["executed_per_request"], ".3f"), _commands(s),
                _fmt_spread(s["server_cpu_us_per_request"], ".0f"),
            ]) + " |"
        )  # fmt: skip

    storms = [s for s in summaries if s["storm"] is not None]
    if storms:
        lines += ["", "## Conflict storms", "",
                  "Executions counted outside the app process (Redis `HINCRBY` per execution, per key).", "",
                  "| scenario | requests | keys executed | executions | duplicate executions | keys executed >1x "
                  "| max per key | 409 | 5xx |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for s in storms:
            st = s["storm"]
            lines.append(
                f"| {s['scenario']} | {s['requests']:,} | {st['keys']:,} | {st['executions']:,} | "
                f"{st['duplicate_executions']:,} | {st['keys_executed_more_than_once']:,} | "
                f"{st['max_executions_per_key']} | {s['status'].get('409', 0):,} | {s['status'].get('5xx', 0):,} |"
            )
    commands = [s for s in summaries if s["redis_commands_by_name"]]
    if commands:
        lines += ["", "## Redis commands per request, by command", ""]
        for s in commands:
            names = ", ".join(f"{name.upper()} {n:g}" for name, n in s["redis_commands_by_name"].items())
            lines.append(f"- {s['scenario']}: {names or 'none'}")
    failed = [s for s in summaries if s["errors"]]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- {s['scenario']}: {' / '.join(error.splitlines())}" for s in failed for error in s["errors"]]
    return "\n".join(lines) + "\n"
