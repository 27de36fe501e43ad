"""Summaries of the raw records (medians over rounds, min-max, ratios against bare in the same round),
the SPEC §7 targets judged from them, and RESULTS.md."""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.grid import TARGETS, Mode, Scenario, all_scenarios, describe_kind, kind_order

Record = dict[str, Any]
Summary = dict[str, Any]
PEERS = ("asgi-idempotency-header", "fastapi-idempotency")
OURS = "relay-idem"
PROXY = "relay-idem-proxy"
SOAK_TARGET_REQUESTS = 200_000  # SPEC §7: the proxy's RSS stays within 20 MB over this many unique keys
SOAK_TARGET_MB = 20.0
SEE_ALSO = (
    ("clients/RESULTS.md", "which Redis client the store's hot path uses (measured side by side)"),
    ("proxy_client/RESULTS.md", "which HTTP client the proxy uses for its upstream (httpx vs aiohttp)"),
)


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
                "workers": scenario.workers,
                "kind": scenario.kind,
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
                "soak": next((r["soak"] for r in reversed(runs) if "soak" in r), None),
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


def _cell(summary: Summary) -> str:
    """A pivot-table cell: bare gets its rps, everything else its ratio and Redis commands."""
    if summary["rps"] is None:
        return "failed" if summary["errors"] else "not run"
    if summary["soak"] is not None:
        soak = summary["soak"]
        return f"RSS {soak['rss_start_mb']:.0f} -> {soak['rss_end_mb']:.0f} MB (max {soak['rss_max_mb']:.0f})"
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


def _commands(summary: Summary) -> str:
    if not summary["redis_commands_counted"]:
        return "n/a"  # the layer keeps no state in Redis
    return _fmt_spread(summary["redis_commands_per_request"], "g")


# --- SPEC §7 targets ---------------------------------------------------------------------------------

MET, NOT_MET, NOT_MEASURED = "met", "**not met**", "not measured"


def _median(summary: Summary | None, field: str) -> float | None:
    if summary is None or summary.get(field) is None:
        return None
    return float(summary[field]["median"])


def _ratio_targets(named: dict[str, Summary]) -> list[tuple[str, str, str]]:
    rows = []
    for mode, floor in ((Mode.REPLAY, 1.0), (Mode.FIRST, 0.6), (Mode.NOKEY, 0.95)):
        summary = named.get(f"{OURS}-{mode}")
        label = f"{mode.description}: ≥ {floor:.2f}x the bare app"
        ratio = _median(summary, "ratio")
        if summary is None or ratio is None:
            rows.append((label, NOT_MEASURED, NOT_MEASURED))
            continue
        measured = _fmt_spread(summary["ratio"], ".2f", "x")
        if ratio < floor:
            measured += f", {(floor - ratio) / floor:.0%} short"
        rows.append((label, measured, MET if ratio >= floor else NOT_MET))
    return rows


def _command_targets(named: dict[str, Summary]) -> list[tuple[str, str, str]]:
    expected = {Mode.FIRST: 2, Mode.REPLAY: 1, Mode.NOKEY: 0}
    rows = []
    for target in (OURS, PROXY):
        counts = {mode: _median(named.get(f"{target}-{mode}"), "redis_commands_per_request") for mode in expected}
        measured = " / ".join("-" if n is None else f"{n:g}" for n in counts.values())
        if any(n is not None and n > expected[mode] for mode, n in counts.items()):
            verdict = NOT_MET
        else:
            verdict = NOT_MEASURED if None in counts.values() else MET
        rows.append((f"{target}: Redis commands per request, first / replay / no key ≤ 2 / 1 / 0", measured, verdict))
    return rows


def _storm_faults(summary: Summary | None) -> tuple[int, int] | None:
    """(duplicate executions, 5xx) of a storm, None when it was not measured."""
    if summary is None or summary["storm"] is None:
        return None
    return summary["storm"]["duplicate_executions"], summary["status"].get("5xx", 0)


def _peer_targets(named: dict[str, Summary], kinds: list[str]) -> list[tuple[str, str, str]]:
    """Ahead of both peers: throughput ratio for first/replay/no key, correctness for the storms."""
    rows = []
    for kind in kinds:
        names = [OURS, *PEERS]
        if kind.startswith(str(Mode.STORM)):
            label = f"ahead of both peers, {describe_kind(kind)}: fewest duplicate executions and 5xx (ties count)"
            faults = [_storm_faults(named.get(f"{name}-{kind}")) for name in names]
            shown = [NOT_MEASURED if f is None else f"{f[0]:,} dup / {f[1]:,} 5xx" for f in faults]
            mine = faults[0]
            behind = mine is not None and any(f is not None and (mine[0] > f[0] or mine[1] > f[1]) for f in faults[1:])
            complete = None not in faults
        else:
            label = f"ahead of both peers, {describe_kind(kind)}: higher throughput (ratio to bare)"
            ratios = [_median(named.get(f"{name}-{kind}"), "ratio") for name in names]
            shown = [NOT_MEASURED if r is None else f"{r:.2f}x" for r in ratios]
            mine_ratio = ratios[0]
            behind = mine_ratio is not None and any(r is not None and mine_ratio <= r for r in ratios[1:])
            complete = None not in ratios
        measured = "; ".join(f"{name} {value}" for name, value in zip(names, shown, strict=True))
        rows.append((label, measured, NOT_MET if behind else MET if complete else NOT_MEASURED))
    return rows


def _soak_target(named: dict[str, Summary]) -> tuple[str, str, str]:
    label = f"proxy RSS flat within {SOAK_TARGET_MB:g} MB over {SOAK_TARGET_REQUESTS:,} unique keys (peak - start)"
    summary = named.get(f"{PROXY}-soak")
    if summary is None or summary["soak"] is None:
        return label, NOT_MEASURED, NOT_MEASURED
    soak = summary["soak"]
    measured = (
        f"+{soak['peak_growth_mb']:.1f} MB (start {soak['rss_start_mb']:.1f}, end {soak['rss_end_mb']:.1f}, "
        f"max {soak['rss_max_mb']:.1f} MB) over {summary['requests']:,} requests"
    )
    if summary["requests"] < SOAK_TARGET_REQUESTS:
        measured += f" (fewer than {SOAK_TARGET_REQUESTS:,}: indicative only)"
    if summary["non_2xx"]:
        measured += f", {summary['non_2xx']:,} non-2xx"
    return label, measured, MET if soak["peak_growth_mb"] < SOAK_TARGET_MB else NOT_MET


def target_rows(summaries: list[Summary]) -> list[tuple[str, str, str]]:
    """(target, measured value, verdict) for every SPEC §7 target, judged from this run's summaries."""
    named = {s["scenario"]: s for s in summaries}
    # Every scenario of ours, measured or not: the table always lists every target.
    kinds = [s.kind for s in all_scenarios() if s.target.name == OURS and s.mode is not Mode.SOAK]
    return [
        *_ratio_targets(named),
        *_command_targets(named),
        *_peer_targets(named, kinds),
        _soak_target(named),
    ]


def _peer_commands_note(named: dict[str, Summary]) -> str:
    parts = []
    for peer in PEERS:
        target = next(t for t in TARGETS if t.name == peer)
        if not target.redis_commands:
            parts.append(f"{peer}: not measured, it has no Redis store (its records live in process memory)")
            continue
        counts = [_median(named.get(f"{peer}-{mode}"), "redis_commands_per_request") for mode in
                  (Mode.FIRST, Mode.REPLAY, Mode.NOKEY)]  # fmt: skip
        if all(n is None for n in counts):
            parts.append(f"{peer}: not measured in this run")
        else:
            parts.append(f"{peer}: " + " / ".join("-" if n is None else f"{n:g}" for n in counts))
    return "Redis commands of the peers, counted the same way (first / replay / no key): " + "; ".join(parts) + "."


def targets_section(summaries: list[Summary]) -> list[str]:
    named = {s["scenario"]: s for s in summaries}
    lines = [
        "## SPEC §7 targets",
        "",
        f"Judged from this run. Ratios and Redis commands are the `{OURS}` middleware's (medians over rounds, "
        "min-max in brackets); the proxy adds a network hop, so its ratios are reported below but not judged.",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {measured} | {verdict} |" for label, measured, verdict in target_rows(summaries)]
    lines += ["", _peer_commands_note(named), ""]
    return lines


# --- RESULTS.md ----------------------------------------------------------------------------------------


def _load_line(settings: dict[str, Any]) -> str:
    line = (
        f"- Load: {settings['generator']}, {settings['threads']} thread(s), {settings['connections']} connections, "
        f"{settings['duration']} s per scenario after {settings['warmup']} s warm-up; {settings['rounds']} round(s) "
        f"alternating A B A B, each scenario in a fresh uvicorn process (uvloop, httptools; 1 worker, `-w2` "
        f"scenarios 2 workers for the app and the proxy in front of it) on a fresh redis-server; storm: "
        f"{settings['storm_burst']} concurrent requests per key against an app that takes "
        f"{settings['storm_delay_ms']:g} ms"
    )
    if "soak_requests" in settings:
        line += (
            f"; soak (once): {settings['soak_requests']:,} unique-key requests through the proxy (1 worker, Redis "
            f"store) in front of the bare app, the proxy's RSS (VmRSS of all its processes) sampled every second"
        )
    return line


def _soak_section(summaries: list[Summary], charts: list[str]) -> list[str]:
    soaks = [s for s in summaries if s["soak"] is not None]
    if not soaks:
        return []
    lines = ["", "## Proxy soak", "",
             "| scenario | requests | rps | p99 ms | non-2xx | processes | RSS start MB | RSS end MB | RSS max MB "
             "| growth MB (end - start) | peak growth MB (max - start) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in soaks:
        soak = s["soak"]
        lines.append(
            f"| {s['scenario']} | {s['requests']:,} | {_fmt_spread(s['rps'], ',.0f')} | "
            f"{_fmt_spread(s['p99_ms'], '.2f')} | {s['non_2xx']:,} | {soak['proxy_processes']} | "
            f"{soak['rss_start_mb']:.1f} | {soak['rss_end_mb']:.1f} | {soak['rss_max_mb']:.1f} | "
            f"{soak['growth_mb']:+.1f} | {soak['peak_growth_mb']:+.1f} |"
        )
    lines += ["", "The RSS series (seconds, MB, requests executed) is in `results.json` (`runs[].soak.samples`)."]
    if "proxy_rss.png" in charts:
        lines += ["", "![Proxy RSS over the soak](proxy_rss.png)"]
    return lines


def _see_also(out: Path) -> list[str]:
    here = Path(__file__).resolve().parent
    lines = ["", "## See also", ""]
    for relative, what in SEE_ALSO:
        link = os.path.relpath(here / relative, out.resolve())
        lines.append(f"- [benchmarks/{relative}]({link}): {what}")
    return lines


def markdown(
    environment: dict[str, Any],
    settings: dict[str, Any],
    summaries: list[Summary],
    records: list[Record],
    charts: Sequence[str] = (),
    out: Path = Path(),
) -> str:
    """RESULTS.md: the §7 targets, how the run was made, summary, charts, details, storms, soak, see also.

    ``charts`` are the PNG file names written next to it (linked when present), ``out`` its directory.
    """
    machine, versions = environment["machine"], environment["versions"]
    foreign = [r["foreign_cpu_pct"] for r in records if "foreign_cpu_pct" in r]
    steal = [r["steal_cpu_pct"] for r in records if "steal_cpu_pct" in r]
    load_note = (
        f"; CPU used by other processes while measuring: median {statistics.median(foreign):.0f} %, "
        f"max {max(foreign):.0f} % of one CPU (steal: max {max(steal):.0f} %)"
        if foreign
        else ""
    )
    lines = ["# Benchmark results", "", *targets_section(summaries)]
    lines += [
        "## The run",
        "",
        f"- Date: {environment['date']} (git {environment['git']})",
        f"- Machine: {machine['nproc']} CPUs (nproc), {machine['cpu_model']}, {machine['memory_gib']} GiB RAM, "
        f"Linux {machine['kernel']}{load_note}",
        "- Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        _load_line(settings),
        f"- Command: `{environment['command']}`",
        "",
        "Ratios are medians of per-round throughput divided by the bare app's in the same round, with min-max over "
        "rounds; storms are judged by duplicate executions and status codes (throughput in the details). "
        "`cmds` = Redis commands the client sent per request (MONITOR, script-internal commands excluded). "
        "Server CPU = CPU time of the app (and the proxy in front of it, all their worker processes) per request, "
        "Redis excluded.",
        "",
    ]
    targets = list(dict.fromkeys(s["target"] for s in summaries))
    kinds = sorted({s["kind"] for s in summaries}, key=kind_order)
    cells = {(s["target"], s["kind"]): s for s in summaries}
    lines += ["## Summary", "", "| scenario | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for kind in kinds:
        row = [describe_kind(kind)]
        for target in targets:
            summary = cells.get((target, kind))
            if summary is None and target == "bare" and not kind.startswith((str(Mode.STORM), str(Mode.SOAK))):
                summary = cells.get(("bare", str(Mode.NOKEY)))
            row.append(_cell(summary) if summary else "")
        lines.append("| " + " | ".join(row) + " |")
    bar_charts = [name for name in ("throughput.png", "p99.png") if name in charts]
    if bar_charts:
        lines += ["", "## Charts", "", "Storms and the soak are left out (see their tables).", ""]
        lines += [f"![{name.removesuffix('.png')}]({name})" for name in bar_charts]

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
                  "Executions counted outside the app process (Redis `HINCRBY` per execution, per key), with 1 and "
                  "with 2 worker processes. A layer that keeps its records in process memory cannot see a duplicate "
                  "that the other worker is running.", "",
                  "| scenario | store | workers | requests | keys executed | executions | duplicate executions "
                  "| keys executed >1x | max per key | 409 | 5xx |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for s in storms:
            st = s["storm"]
            lines.append(
                f"| {s['scenario']} | {s['store']} | {s['workers']} | {s['requests']:,} | {st['keys']:,} | "
                f"{st['executions']:,} | {st['duplicate_executions']:,} | {st['keys_executed_more_than_once']:,} | "
                f"{st['max_executions_per_key']} | {s['status'].get('409', 0):,} | {s['status'].get('5xx', 0):,} |"
            )
    lines += _soak_section(summaries, list(charts))
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
    lines += _see_also(out)
    return "\n".join(lines) + "\n"
