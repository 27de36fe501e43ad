"""Summaries of the raw records (medians over rounds, min-max, ratios against the baseline in the same
round), RESULTS.md, and the README's benchmark table.

``python -m benchmarks.report --readme`` rewrites the marked block of README.md from
``benchmarks/results.json``; ``--check`` only says whether RESULTS.md and that block are current.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import scale_report, verdicts
from benchmarks.grid import TARGETS, Group, Mode, Scenario, all_scenarios, describe_kind, kind_order
from benchmarks.verdicts import fmt_spread

Record = dict[str, Any]
Summary = dict[str, Any]
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
README = REPO / "README.md"
README_BEGIN = "<!-- benchmark-table:begin (python -m benchmarks.report --readme) -->"
README_END = "<!-- benchmark-table:end -->"
SEE_ALSO = (
    ("clients/RESULTS.md", "which Redis client the store's hot path uses (measured side by side)"),
    ("scale/RESULTS.md", "Redis at scale: CPU and memory per record, writes lost in a failover, fault figures"),
)


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ok_rps(record: Record) -> float:
    """2xx answers per second of a run (computed, so records written before ``ok_rps`` existed work too)."""
    run = record["load"]
    return float(run["status"].get("2xx", 0) / run["duration_s"]) if run["duration_s"] else 0.0


def _proxy_cpu(record: Record) -> float | None:
    value = record["cpu_us_per_request"].get("proxy")
    return None if value is None else float(value)


def _server_cpu(record: Record) -> float | None:
    """CPU µs per request of what serves HTTP under test: the app and the proxy in front of it (not Redis);
    in the proxy group only the proxy (not the fast upstream)."""
    cpu = record["cpu_us_per_request"]
    if None in cpu.values():
        return None
    if "upstream" in cpu:
        return _proxy_cpu(record)
    return float(sum(v for k, v in cpu.items() if k != "redis"))


def _per_round(runs: list[Record], other: dict[int, Record], value: Any) -> list[float]:
    """``value(run) / value(other run of the same round)`` for every round both have a value in."""
    ratios = []
    for run in runs:
        base = other.get(run["round"])
        mine, theirs = value(run), value(base) if base is not None else None
        if mine is not None and theirs:
            ratios.append(mine / theirs)
    return ratios


def summarise(scenarios: list[Scenario], records: list[Record]) -> list[Summary]:
    """One summary per scenario, in grid order."""
    ok = [r for r in records if "error" not in r]
    by_round: dict[str, dict[int, Record]] = defaultdict(dict)
    by_scenario: dict[str, list[Record]] = defaultdict(list)
    for record in ok:
        by_scenario[record["scenario"]].append(record)
        by_round[record["scenario"]][record["round"]] = record
    errors = defaultdict(list)
    for record in records:
        if "error" in record:
            errors[record["scenario"]].append(f"round {record['round']}: {record['error']}")

    summaries = []
    for scenario in scenarios:
        every = by_scenario.get(scenario.name, [])
        runs = [r for r in every if "load" in r]  # the wake measurement puts no load on a server
        baseline = by_round.get(scenario.baseline or "", {})
        ours = scenario.target.name == verdicts.PROXY_FAST
        peer = by_round.get(f"{verdicts.ASGIPROXY}-{scenario.mode}", {}) if ours else {}
        commands = [r["redis_commands"]["per_request"] for r in runs if "redis_commands" in r]
        storms = [r["storm"] for r in runs if "storm" in r]
        proxy = scenario.target.fast_upstream
        summaries.append(
            {
                "scenario": scenario.name,
                "target": scenario.target.name,
                "mode": str(scenario.mode),
                "workers": scenario.workers,
                "kind": scenario.kind,
                "group": str(scenario.group),
                "store": scenario.target.store,
                "baseline": scenario.baseline,
                "redis_commands_counted": scenario.target.redis_commands,
                "rounds": len(every),
                "rps": _spread([ok_rps(r) for r in runs]),  # 2xx answers per second
                "ratio": _spread(_per_round(runs, baseline, ok_rps)),
                "peer_ratio": _spread(_per_round(runs, peer, ok_rps)) if peer else None,
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
                "server_cpu_us_per_request": _spread([v for r in runs if (v := _server_cpu(r)) is not None]),
                "proxy_cpu_us_per_request": _spread([v for r in runs if (v := _proxy_cpu(r)) is not None])
                if proxy
                else None,
                "cpu_ratio": _spread(_per_round(runs, baseline, _proxy_cpu)) if proxy else None,
                "storm": _sum_storms(storms) if storms else None,
                "soak": next((r["soak"] for r in reversed(runs) if "soak" in r), None),
                "wake": _sum_wakes([r["wake"] for r in every if "wake" in r]),
                "errors": errors.get(scenario.name, []),
            }
        )
    return summaries


def summarise_document(records: list[Record]) -> list[Summary]:
    """Summaries of every scenario of the grid that has a record (a run may have covered only some)."""
    ran = {record["scenario"] for record in records}
    return summarise([s for s in all_scenarios() if s.name in ran], records)


def _sum_dicts(dicts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for d in dicts:
        for key, value in d.items():
            total[key] += value
    return dict(total)


def _sum_wakes(wakes: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not wakes:
        return None
    return {
        "rounds": len(wakes),
        "waiters": sum(w["waiters"] for w in wakes),
        "p50_ms": statistics.median(w["p50_ms"] for w in wakes),
        "p99_ms": max(w["p99_ms"] for w in wakes),
        "max_ms": max(w["max_ms"] for w in wakes),
        "bound_ms": wakes[0]["bound_ms"],
    }


def _sum_storms(storms: list[dict[str, int]]) -> dict[str, int]:
    total = _sum_dicts([{k: v for k, v in s.items() if k != "max_executions_per_key"} for s in storms])
    total["max_executions_per_key"] = max(s["max_executions_per_key"] for s in storms)
    return total


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def _cell(summary: Summary) -> str:
    """A pivot-table cell: bare gets its 2xx/s, everything else its ratio and Redis commands."""
    if summary["rps"] is None:
        return "failed" if summary["errors"] else "not run"
    if summary["soak"] is not None:
        soak = summary["soak"]
        return f"RSS {soak['rss_start_mb']:.0f} -> {soak['rss_end_mb']:.0f} MB (max {soak['rss_max_mb']:.0f})"
    if summary["baseline"] is None:
        return f"{summary['rps']['median']:,.0f} 2xx/s"
    if summary["storm"] is not None:  # throughput means little here: 409s are cheap, waiting is slow
        storm, requests = summary["storm"], summary["requests"] or 1
        parts = [
            f"{storm['duplicate_executions']} duplicate executions",
            f"409 {summary['status'].get('409', 0) / requests:.0%}",
        ]
        if summary["status"].get("5xx"):
            parts.append(f"**{summary['status']['5xx']} x 5xx**")
        return " · ".join(parts)
    parts = [fmt_spread(summary["ratio"], ".2f", "x")]
    commands = summary["redis_commands_per_request"]
    if commands is not None and summary["store"] == "redis":
        parts.append(f"{commands['median']:g} cmds")
    executed = summary["executed_per_request"]
    if summary["mode"] == Mode.NOKEY and (executed is None or executed["median"] < 0.99):
        parts.append(f"executed {executed['median'] if executed else 0:.0%}")
    if summary["non_2xx"]:
        parts.append(f"**{summary['non_2xx']:,} non-2xx**")
    return " · ".join(parts)


def _commands(summary: Summary) -> str:
    if not summary["redis_commands_counted"]:
        return "n/a"  # the layer keeps no state in Redis
    return fmt_spread(summary["redis_commands_per_request"], "g")


def _peer_commands_note(named: dict[str, Summary]) -> str:
    parts = []
    for peer in verdicts.PEERS:
        target = next(t for t in TARGETS if t.name == peer)
        if not target.redis_commands:
            parts.append(f"{peer}: not measured, it has no Redis store (its records live in process memory)")
            continue
        counts = [verdicts.median(named.get(f"{peer}-{mode}"), "redis_commands_per_request") for mode in
                  (Mode.FIRST, Mode.REPLAY, Mode.NOKEY)]  # fmt: skip
        if all(n is None for n in counts):
            parts.append(f"{peer}: not measured in this run")
        else:
            parts.append(f"{peer}: " + " / ".join("-" if n is None else f"{n:g}" for n in counts))
    return "Redis commands of the peers, counted the same way (first / replay / no key): " + "; ".join(parts) + "."


def _target_table(summaries: list[Summary]) -> list[str]:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    return lines + [f"| {label} | {measured} | {verdict} |" for label, measured, verdict in
                    verdicts.target_rows(summaries)]  # fmt: skip


def targets_section(summaries: list[Summary]) -> list[str]:
    named = {s["scenario"]: s for s in summaries}
    lines = [
        "## SPEC §7 targets",
        "",
        "Judged from this run (medians over rounds, min-max in brackets). Throughput is 2xx answers per "
        "second, divided by the baseline's in the same round; the non-2xx answers are shown beside it. "
        '"Ahead" is strict: an equal value (ratios as shown, to 2 decimals) is a **tie**. The middleware rows are '
        f"the `{verdicts.OURS}` middleware's against the bare app; the proxy rows are relay-idem's proxy against "
        "nginx `proxy_pass` and asgiproxy, each in front of the same nginx fast upstream (CPU of the proxy's own "
        "processes per request).",
        "",
        *_target_table(summaries),
    ]
    return [*lines, "", _peer_commands_note(named), ""]


# --- RESULTS.md ----------------------------------------------------------------------------------------


def _load_line(settings: dict[str, Any]) -> str:
    nokey = settings.get("nokey_rounds", settings["rounds"])
    line = (
        f"- Load: {settings['generator']}, {settings['threads']} thread(s), {settings['connections']} connections, "
        f"{settings['duration']} s per scenario after {settings['warmup']} s warm-up; {settings['rounds']} round(s) "
        f"alternating A B A B"
        + (f" ({max(nokey, settings['rounds'])} for the middleware's no-key scenarios and bare)" if nokey > settings[
            "rounds"] else "")
        + ", each scenario in fresh processes (uvicorn with uvloop and httptools; 1 worker, `-w2` scenarios "
        "2 workers for the app and the proxy in front of it) on a fresh redis-server; storm: "
        f"{settings['storm_burst']} concurrent requests per key against an app that takes "
        f"{settings['storm_delay_ms']:g} ms"
    )  # fmt: skip
    if settings.get("proxy_args"):
        line += f"; every relay-idem proxy started with `{' '.join(settings['proxy_args'])}`"
    if "soak_requests" in settings:
        line += (
            f"; soak (once): {settings['soak_requests']:,} unique-key requests through the proxy (1 worker, Redis "
            f"store) in front of the bare app, the proxy's RSS (VmRSS of all its processes) sampled every second"
        )
    return line


def _run_section(environment: dict[str, Any], parts: list[dict[str, Any]], records: list[Record]) -> list[str]:
    machine, versions = environment["machine"], environment["versions"]
    foreign = [r["foreign_cpu_pct"] for r in records if "foreign_cpu_pct" in r]
    steal = [r["steal_cpu_pct"] for r in records if "steal_cpu_pct" in r]
    load_note = (
        f"; CPU used by other processes while measuring: median {statistics.median(foreign):.0f} %, "
        f"max {max(foreign):.0f} % of one CPU (steal: max {max(steal):.0f} %)"
        if foreign
        else ""
    )
    lines = ["## The run", ""]
    for part in parts:
        env, settings = part["environment"], part["settings"]
        which = f" — groups: {', '.join(part['groups'])}" if len(parts) > 1 else ""
        lines += [
            f"- Date: {env['date']} (git {env['git']}){which}",
            f"- Command: `{env['command']}`",
            _load_line(settings),
        ]
    lines += [
        f"- Machine: {machine['nproc']} CPUs (nproc), {machine['cpu_model']}, {machine['memory_gib']} GiB RAM, "
        f"Linux {machine['kernel']}{load_note}",
        "- Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        "",
        "Ratios are medians of per-round 2xx answers per second divided by the baseline's in the same round, with "
        "min-max over rounds; storms are judged by duplicate executions and status codes (throughput in the "
        "details). `cmds` = Redis commands the client sent per request (MONITOR, script-internal commands "
        "excluded). Server CPU = CPU time of the app (and the proxy in front of it, all their worker processes) per "
        "request, Redis excluded; in the proxy group, of the proxy's processes only.",
        "",
    ]
    return lines


def _summary_section(summaries: list[Summary], charts: Sequence[str]) -> list[str]:
    table = [s for s in summaries if s["group"] != Group.PROXY and s["wake"] is None]
    if not table:
        return []
    targets = list(dict.fromkeys(s["target"] for s in table))
    kinds = sorted({s["kind"] for s in table}, key=kind_order)
    cells = {(s["target"], s["kind"]): s for s in table}
    lines = ["## Summary", "", "| scenario | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
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
        lines += ["", "## Charts", "", "Storms, the proxy group and the soak are left out (see their tables).", ""]
        lines += [f"![{name.removesuffix('.png')}]({name})" for name in bar_charts]
    return lines


def _proxy_section(summaries: list[Summary], charts: Sequence[str]) -> list[str]:
    group = [s for s in summaries if s["group"] == Group.PROXY]
    if not group:
        return []
    targets = list(dict.fromkeys((s["target"], s["workers"]) for s in group))
    cells = {(s["target"], s["workers"], s["mode"]): s for s in group}
    names = [f"{target}" + (f" ({workers} workers)" if workers > 1 else "") for target, workers in targets]
    lines = ["", "## Proxy, against nginx", "",
             "Each proxy in front of the same nginx fast upstream (`return 202` with a fixed JSON body), one proxy "
             "process each (relay-idem also with `--workers 2`); nginx `proxy_pass` with a `keepalive 64` upstream "
             "pool is the reference and asgiproxy 0.2 (Starlette + aiohttp, under uvicorn) the Python peer; neither "
             "does idempotency. Each cell: CPU µs per request of the proxy's own processes (its x nginx's in the "
             "same round), 2xx answers per second, non-2xx answers.", "",
             "| scenario | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]  # fmt: skip
    for mode in (Mode.NOKEY, Mode.FIRST, Mode.REPLAY):
        row = [mode.description]
        for target, workers in targets:
            s = cells.get((target, workers, str(mode)))
            if s is None or s["rps"] is None:
                row.append("failed" if s is not None and s["errors"] else "")
                continue
            cpu = fmt_spread(s["proxy_cpu_us_per_request"], ".0f", " µs")
            if s["cpu_ratio"] is not None:
                cpu += f" ({s['cpu_ratio']['median']:.1f}x)"
            row.append(f"{cpu} · {s['rps']['median']:,.0f} 2xx/s · {s['non_2xx']:,} non-2xx")
        lines.append("| " + " | ".join(row) + " |")
    if "proxy_cpu.png" in charts:
        lines += ["", "![Proxy CPU per request](proxy_cpu.png)"]
    return lines


def _details_section(summaries: list[Summary]) -> list[str]:
    lines = ["", "## Details", "",
             "| scenario | store | 2xx/s median (min-max) | ratio | p50 ms | p99 ms | requests | non-2xx | 409 | 5xx "
             "| executed/req | Redis cmds/req | server CPU µs/req |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summaries:
        if s["wake"] is not None:  # no load: its numbers are in the targets table
            continue
        lines.append(
            "| " + " | ".join([
                s["scenario"], s["store"], fmt_spread(s["rps"], ",.0f"),
                fmt_spread(None if s["storm"] else s["ratio"], ".2f", "x"),
                fmt_spread(s["p50_ms"], ".2f"), fmt_spread(s["p99_ms"], ".2f"), f"{s['requests']:,}",
                f"{s['non_2xx']:,}", str(s["status"].get("409", 0)), str(s["status"].get("5xx", 0)),
                fmt_spread(s["executed_per_request"], ".3f"), _commands(s),
                fmt_spread(s["server_cpu_us_per_request"], ".0f"),
            ]) + " |"
        )  # fmt: skip
    return lines


def _storm_section(summaries: list[Summary]) -> list[str]:
    storms = [s for s in summaries if s["storm"] is not None]
    if not storms:
        return []
    lines = ["", "## Conflict storms", "",
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
    return lines


def _soak_section(summaries: list[Summary], charts: Sequence[str]) -> list[str]:
    soaks = [s for s in summaries if s["soak"] is not None]
    if not soaks:
        return []
    lines = ["", "## Proxy soak", "",
             "| scenario | requests | 2xx/s | p99 ms | non-2xx | processes | RSS start MB | RSS end MB | RSS max MB "
             "| growth MB (end - start) | peak growth MB (max - start) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in soaks:
        soak = s["soak"]
        lines.append(
            f"| {s['scenario']} | {s['requests']:,} | {fmt_spread(s['rps'], ',.0f')} | "
            f"{fmt_spread(s['p99_ms'], '.2f')} | {s['non_2xx']:,} | {soak['proxy_processes']} | "
            f"{soak['rss_start_mb']:.1f} | {soak['rss_end_mb']:.1f} | {soak['rss_max_mb']:.1f} | "
            f"{soak['growth_mb']:+.1f} | {soak['peak_growth_mb']:+.1f} |"
        )
    lines += ["", "The RSS series (seconds, MB, requests executed) is in `results.json` (`runs[].soak.samples`)."]
    if "proxy_rss.png" in charts:
        lines += ["", "![Proxy RSS over the soak](proxy_rss.png)"]
    return lines


def _see_also(out: Path) -> list[str]:
    lines = ["", "## See also", ""]
    for relative, what in SEE_ALSO:
        link = os.path.relpath(HERE / relative, out.resolve())
        lines.append(f"- [benchmarks/{relative}]({link}): {what}")
    return lines


def parts_of(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs a results.json was put together from (``--only`` reruns replace their groups' records)."""
    if "parts" in document:
        return list(document["parts"])
    groups = sorted({str(s.group) for s in all_scenarios() if s.name in {r["scenario"] for r in document["runs"]}})
    return [{"groups": groups, "environment": document["environment"], "settings": document["settings"]}]


def markdown(document: dict[str, Any], summaries: list[Summary], charts: Sequence[str] = (),
             out: Path = Path()) -> str:  # fmt: skip
    """RESULTS.md: the §7 targets, how the run was made, summary, charts, proxy group, details, storms, soak.

    ``charts`` are the PNG file names written next to it (linked), ``out`` its directory.
    """
    records = document["runs"]
    lines = ["# Benchmark results", "", *targets_section(summaries)]
    lines += _run_section(document["environment"], parts_of(document), records)
    lines += _summary_section(summaries, charts)
    lines += _proxy_section(summaries, charts)
    lines += _details_section(summaries)
    lines += _storm_section(summaries)
    lines += _soak_section(summaries, charts)
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


# --- README.md -----------------------------------------------------------------------------------------


def readme_block(document: dict[str, Any], summaries: list[Summary]) -> str:
    """The README's benchmark table: every §7 target row, met or not, and where it comes from."""
    dates = "; ".join(f"{p['environment']['date']} (git {p['environment']['git']}, `{p['environment']['command']}`)"
                      for p in parts_of(document))  # fmt: skip
    lines = [
        README_BEGIN,
        f"From [benchmarks/results.json](benchmarks/results.json), run {dates}; every SPEC §7 target, met or "
        "not (details and charts in [benchmarks/RESULTS.md](benchmarks/RESULTS.md)):",
        "",
        *_target_table(summaries),
        README_END,
    ]
    return "\n".join(lines)


def replace_block(text: str, block: str, begin: str = README_BEGIN, end: str = README_END) -> str:
    """``text`` with the block between ``begin`` and ``end`` (markers included) replaced by ``block``, which
    starts and ends with them; ValueError without the markers."""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"README.md has no {begin} ... {end} block")
    return text[:start] + block + text[stop + len(end) :]


def rewrite_readme(text: str, document: dict[str, Any], summaries: list[Summary]) -> str:
    """README.md's text with its benchmark table and its scale figures rendered from the committed results."""
    text = replace_block(text, readme_block(document, summaries))
    scale = scale_report.readme_block(scale_report.load())
    return replace_block(text, scale, scale_report.README_BEGIN, scale_report.README_END)


def load(out: Path) -> tuple[dict[str, Any], list[Summary]]:
    document = json.loads((out / "results.json").read_text())
    return document, summarise_document(document["runs"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="rewrite the benchmark table of README.md")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when RESULTS.md or the README table differ from results.json")  # fmt: skip
    parser.add_argument("--dir", type=Path, default=HERE, help="where results.json is (default benchmarks/)")
    args = parser.parse_args(argv)
    document, summaries = load(args.dir)
    readme = README.read_text()
    if args.check:
        from benchmarks import charts

        stale = []
        expected = markdown(document, summaries, charts.chart_names(summaries), args.dir)
        if (args.dir / "RESULTS.md").read_text() != expected:
            stale.append(str(args.dir / "RESULTS.md"))
        scale = scale_report.HERE / "RESULTS.md"
        if scale.is_file() and scale.read_text() != scale_report.markdown(scale_report.load()):
            stale.append(str(scale))
        if rewrite_readme(readme, document, summaries) != readme:
            stale.append(str(README))
        for path in stale:
            print(f"{path} is not what the committed results.json renders to (python -m benchmarks --render)")
        return 1 if stale else 0
    if args.readme:
        README.write_text(rewrite_readme(readme, document, summaries))
        print(f"wrote the benchmark table and the scale figures of {README}")
        return 0
    parser.print_usage(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
