"""The SPEC §7 targets, judged from a run's summaries: one row (target, measured, verdict) each.

Every "ahead of the peers" row is strict: equal values are a **tie**, which is not "ahead".
Throughput is counted in 2xx answers per second (a layer that answered errors fast would
otherwise look fast), with the non-2xx count shown beside it.
"""

from __future__ import annotations

from typing import Any

from benchmarks.grid import NGINX_PROXY, Mode, all_scenarios, describe_kind

Summary = dict[str, Any]
Row = tuple[str, str, str]  # (target, measured, verdict)

MET, NOT_MET, TIE, NOT_MEASURED, NOT_JUDGED, REPORTED = (
    "met", "**not met**", "**tie**", "not measured", "not judged", "reported, not judged",
)  # fmt: skip
VERDICTS = frozenset({MET, NOT_MET, TIE, NOT_MEASURED, NOT_JUDGED, REPORTED})
OURS = "relay-idem"
PROXY = "relay-idem-proxy"  # in front of the bare app: storms and the soak
PROXY_FAST = "proxy-relay-idem"  # in front of the nginx fast upstream: the proxy group
ASGIPROXY = "proxy-asgiproxy"
PEERS = ("asgi-idempotency-header", "fastapi-idempotency", "idemkit")
# SPEC §7, middleware against the bare app (2xx/s ratios): replay, first execution, no key.
MIDDLEWARE_FLOORS = ((Mode.REPLAY, 1.1), (Mode.FIRST, 0.6), (Mode.NOKEY, 0.97))
NOKEY_MIN_ROUNDS = 5  # "interleaved rounds, at least 5 for the no-key scenario"
# SPEC §7, the proxy against nginx: CPU of the proxy's processes per request, at most this many times nginx's.
PROXY_CPU_CEILINGS = ((Mode.NOKEY, 2.5), (Mode.FIRST, 4.0), (Mode.REPLAY, 1.5))
PROXY_RPS_FLOOR = 4.0  # no key: at least this many times asgiproxy's 2xx/s
SOAK_TARGET_REQUESTS = 200_000  # the proxy's RSS stays within 20 MB over this many unique keys
SOAK_TARGET_MB = 20.0
RATIO_DIGITS = 2  # ratios are compared as shown: 0.93x against 0.93x is a tie


def median(summary: Summary | None, field: str) -> float | None:
    if summary is None or summary.get(field) is None:
        return None
    return float(summary[field]["median"])


def fmt_spread(spread: dict[str, float] | None, fmt: str, unit: str = "") -> str:
    if spread is None:
        return "-"
    middle = format(spread["median"], fmt) + unit
    if spread["min"] == spread["max"]:
        return middle
    return f"{middle} ({format(spread['min'], fmt)}-{format(spread['max'], fmt)})"


def _non_2xx(summary: Summary) -> str:
    return f"{summary['non_2xx']:,} non-2xx"


def _middleware_floors(named: dict[str, Summary]) -> list[Row]:
    rows = []
    for mode, floor in MIDDLEWARE_FLOORS:
        summary = named.get(f"{OURS}-{mode}")
        label = f"{mode.description}: ≥ {floor:.2f}x the bare app's 2xx/s"
        if mode is Mode.NOKEY:
            label += f", ≥ {NOKEY_MIN_ROUNDS} interleaved rounds"
        ratio = median(summary, "ratio")
        if summary is None or ratio is None:
            rows.append((label, NOT_MEASURED, NOT_MEASURED))
            continue
        measured = f"{fmt_spread(summary['ratio'], '.2f', 'x')}, {_non_2xx(summary)}"
        if ratio < floor:
            measured += f", {(floor - ratio) / floor:.0%} short"
        verdict = MET if ratio >= floor else NOT_MET
        if mode is Mode.NOKEY and summary["rounds"] < NOKEY_MIN_ROUNDS:
            measured += f"; {summary['rounds']} round(s), fewer than {NOKEY_MIN_ROUNDS}"
            verdict = NOT_JUDGED if verdict == MET else NOT_MET  # too few rounds to call it met
        rows.append((label, measured, verdict))
    return rows


def _command_rows(named: dict[str, Summary]) -> list[Row]:
    expected = {Mode.FIRST: 2, Mode.REPLAY: 1, Mode.NOKEY: 0}
    rows = []
    for target, what in ((OURS, "middleware"), (PROXY_FAST, "proxy")):
        counts = {mode: median(named.get(f"{target}-{mode}"), "redis_commands_per_request") for mode in expected}
        measured = " / ".join("-" if n is None else f"{n:g}" for n in counts.values())
        if any(n is not None and n > expected[mode] for mode, n in counts.items()):
            verdict = NOT_MET
        else:
            verdict = NOT_MEASURED if None in counts.values() else MET
        rows.append((f"{what}: Redis commands per request, first / replay / no key ≤ 2 / 1 / 0", measured, verdict))
    return rows


def _wake_row(named: dict[str, Summary]) -> Row:
    summary = named.get(f"{OURS}-{Mode.WAKE}")
    wake = None if summary is None else summary["wake"]
    label = "wait mode: a waiting repeat gets the replay within 50 ms of the first request's answer (SPEC §6a)"
    if wake is None:
        return label, NOT_MEASURED, NOT_MEASURED
    measured = (
        f"max {wake['max_ms']:.1f} ms, p50 {wake['p50_ms']:.1f} ms over {wake['waiters']:,} waiting repeats "
        f"(in-process, RedisStore)"
    )
    return label, measured, MET if wake["max_ms"] <= wake["bound_ms"] else NOT_MET


def _storm_faults(summary: Summary | None) -> tuple[int, int] | None:
    """(duplicate executions, 5xx) of a storm, None when it was not measured."""
    if summary is None or summary["storm"] is None:
        return None
    return summary["storm"]["duplicate_executions"], summary["status"].get("5xx", 0)


def _compare_storm(mine: tuple[int, int], theirs: tuple[int, int]) -> int:
    """1 ahead (no worse in both, better in one), 0 tie, -1 not ahead (worse in one)."""
    if mine == theirs:
        return 0
    return 1 if mine[0] <= theirs[0] and mine[1] <= theirs[1] else -1


def _compare_ratio(mine: float, theirs: float) -> int:
    a, b = round(mine, RATIO_DIGITS), round(theirs, RATIO_DIGITS)
    return (a > b) - (a < b)


def _peer_rows(named: dict[str, Summary]) -> list[Row]:
    """Ahead of every peer: 2xx/s ratio for first/replay/no key, correctness for the storms."""
    kinds = [s.kind for s in all_scenarios() if s.target.name == OURS and s.mode is not Mode.WAKE]
    rows = []
    names = [OURS, *PEERS]
    for kind in kinds:
        summaries = [named.get(f"{name}-{kind}") for name in names]
        comparisons: list[int | None] = []
        if kind.startswith(str(Mode.STORM)):
            label = f"ahead of every peer, {describe_kind(kind)}: fewer duplicate executions and 5xx"
            faults = [_storm_faults(s) for s in summaries]
            shown = [NOT_MEASURED if f is None else f"{f[0]:,} dup / {f[1]:,} 5xx" for f in faults]
            mine_f = faults[0]
            for theirs_f in faults[1:]:
                both = mine_f is not None and theirs_f is not None
                comparisons.append(_compare_storm(mine_f, theirs_f) if both else None)  # type: ignore[arg-type]
        else:
            label = f"ahead of every peer, {describe_kind(kind)}: more 2xx/s (ratio to bare)"
            ratios = [median(s, "ratio") for s in summaries]
            shown = [
                NOT_MEASURED if r is None or s is None else f"{r:.2f}x ({s['non_2xx']:,} non-2xx)"
                for r, s in zip(ratios, summaries, strict=True)
            ]
            mine_r = ratios[0]
            for theirs_r in ratios[1:]:
                both = mine_r is not None and theirs_r is not None
                comparisons.append(_compare_ratio(mine_r, theirs_r) if both else None)  # type: ignore[arg-type]
        measured = "; ".join(f"{name} {value}" for name, value in zip(names, shown, strict=True))
        ties = [name for name, c in zip(PEERS, comparisons, strict=True) if c == 0]
        if ties:
            measured += f"; tie with {', '.join(ties)}"
        if any(c == -1 for c in comparisons):
            verdict = NOT_MET
        elif ties:
            verdict = TIE
        else:
            verdict = NOT_MEASURED if None in comparisons else MET
        rows.append((label, measured, verdict))
    return rows


def _proxy_rows(named: dict[str, Summary]) -> list[Row]:
    rows = []
    for mode, ceiling in PROXY_CPU_CEILINGS:
        ours, nginx = named.get(f"{PROXY_FAST}-{mode}"), named.get(f"{NGINX_PROXY}-{mode}")
        label = f"proxy, {mode.description}: CPU per request ≤ {ceiling:g}x nginx proxy_pass's"
        ratio = median(ours, "cpu_ratio")
        if ours is None or nginx is None or ratio is None:
            rows.append((label, NOT_MEASURED, NOT_MEASURED))
            continue
        measured = (
            f"{fmt_spread(ours['cpu_ratio'], '.1f', 'x')}: relay-idem {median(ours, 'proxy_cpu_us_per_request'):.0f} "
            f"µs, nginx {median(nginx, 'proxy_cpu_us_per_request'):.0f} µs; {_non_2xx(ours)}"
        )
        rows.append((label, measured, MET if ratio <= ceiling else NOT_MET))
    ours, peer = named.get(f"{PROXY_FAST}-{Mode.NOKEY}"), named.get(f"{ASGIPROXY}-{Mode.NOKEY}")
    label = f"proxy, no key: ≥ {PROXY_RPS_FLOOR:g}x asgiproxy's 2xx/s"
    ratio = median(ours, "peer_ratio")
    if ours is None or peer is None or ratio is None:
        rows.append((label, NOT_MEASURED, NOT_MEASURED))
    else:
        measured = (
            f"{fmt_spread(ours['peer_ratio'], '.2f', 'x')}: relay-idem {median(ours, 'rps'):,.0f} 2xx/s "
            f"({_non_2xx(ours)}), asgiproxy {median(peer, 'rps'):,.0f} ({_non_2xx(peer)})"
        )
        if ratio < PROXY_RPS_FLOOR:
            measured += f", {(PROXY_RPS_FLOOR - ratio) / PROXY_RPS_FLOOR:.0%} short"
        rows.append((label, measured, MET if ratio >= PROXY_RPS_FLOOR else NOT_MET))
    parts = []
    for mode in (Mode.NOKEY, Mode.FIRST, Mode.REPLAY):
        one, two = named.get(f"{PROXY_FAST}-{mode}"), named.get(f"{PROXY_FAST}-{mode}-w2")
        rps_one, rps_two = median(one, "rps"), median(two, "rps")
        if one is None or two is None or not rps_one or rps_two is None:
            continue
        parts.append(
            f"{mode.description} {rps_two / rps_one:.2f}x the 2xx/s ({rps_two:,.0f} against {rps_one:,.0f}), "
            f"{median(two, 'proxy_cpu_us_per_request'):.0f} against {median(one, 'proxy_cpu_us_per_request'):.0f} "
            f"µs CPU/request"
        )
    measured = "; ".join(parts) if parts else NOT_MEASURED
    rows.append(("proxy, `--workers 2` against `--workers 1` (2 cores shared with wrk and the upstream)", measured,
                 REPORTED if parts else NOT_MEASURED))  # fmt: skip
    return rows


def _soak_row(named: dict[str, Summary]) -> Row:
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


def target_rows(summaries: list[Summary]) -> list[Row]:
    """(target, measured value, verdict) for every SPEC §7 target, judged from this run's summaries.

    Every target has a row, measured or not.
    """
    named = {s["scenario"]: s for s in summaries}
    return [*_middleware_floors(named), *_command_rows(named), _wake_row(named), *_peer_rows(named),
            *_proxy_rows(named), _soak_row(named)]  # fmt: skip
