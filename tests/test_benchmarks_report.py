"""The benchmark reports: the committed ones are what results.json renders to; the verdicts are strict.

These need no Redis and no load: they read ``benchmarks/results.json`` or build small records by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import charts, cli, report, scale_report, verdicts

BENCHMARKS = report.HERE


def test_committed_results_md_and_readme_table_are_what_results_json_renders_to() -> None:
    # After a benchmark run, RESULTS.md, results.json and the README table are committed together:
    # `python -m benchmarks --render` rewrites the first and last from results.json.
    document, summaries = report.load(BENCHMARKS)
    expected = report.markdown(document, summaries, charts.chart_names(summaries), BENCHMARKS)
    assert (BENCHMARKS / "RESULTS.md").read_text() == expected
    readme = report.README.read_text()
    assert report.rewrite_readme(readme, document, summaries) == readme
    # The same for scripts/measure_scale.py's results and the README's scale figures.
    scale = scale_report.load()
    assert scale, "benchmarks/scale/results.json is missing"
    assert (scale_report.HERE / "RESULTS.md").read_text() == scale_report.markdown(scale)
    assert scale_report.readme_block(scale) in readme


def record(scenario: str, round_no: int, ok: int, bad: int = 0, seconds: float = 1.0, **extra: Any) -> dict[str, Any]:
    """A measured run: ``ok`` 2xx and ``bad`` 5xx answers in ``seconds``."""
    target, _, mode = scenario.rpartition("-")
    if scenario == "bare":
        target, mode = "bare", "nokey"
    return {
        "scenario": scenario, "target": target, "mode": mode, "workers": 1, "round": round_no,
        "load": {"requests": ok + bad, "duration_s": seconds, "rps": (ok + bad) / seconds, "p50_ms": 1.0,
                 "p99_ms": 2.0, "non_2xx": bad, "status": {"2xx": ok, "5xx": bad}, "errors": {}},
        "executed_per_request": 1.0, "cpu_us_per_request": {"app": 100.0, "redis": 10.0}, **extra,
    }  # fmt: skip


def rows_of(records: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {label: (measured, verdict) for label, measured, verdict in
            verdicts.target_rows(report.summarise_document(records))}  # fmt: skip


FIRST = "unique key (first execution)"


def test_an_equal_ratio_is_a_tie_not_ahead() -> None:
    records = [record("bare", 1, 1000), record("relay-idem-first", 1, 500)]
    records += [record(f"{peer}-first", 1, 400) for peer in verdicts.PEERS[:2]]
    label = f"ahead of every peer, {FIRST}: more 2xx/s (ratio to bare)"
    assert rows_of([*records, record("idemkit-first", 1, 480)])[label][1] == verdicts.MET
    # 0.5 against 0.5: equal as shown, a tie (not met: the target is "ahead").
    measured, verdict = rows_of([*records, record("idemkit-first", 1, 501)])[label]
    assert verdict == verdicts.TIE and "tie with idemkit" in measured
    assert rows_of([*records, record("idemkit-first", 1, 520)])[label][1] == verdicts.NOT_MET


def storm(scenario: str, duplicates: int, errors: int = 0) -> dict[str, Any]:
    counts = {"keys": 10, "executions": 10 + duplicates, "duplicate_executions": duplicates,
              "keys_executed_more_than_once": min(duplicates, 10),
              "max_executions_per_key": 1 + duplicates}  # fmt: skip
    return record(scenario, 1, 900, errors, storm=counts)


def test_a_storm_with_as_few_duplicates_as_a_peer_is_a_tie() -> None:
    label = "ahead of every peer, conflict storm (duplicates in flight), 1 worker: fewer duplicate executions and 5xx"
    peers = [storm("asgi-idempotency-header-storm", 3), storm("fastapi-idempotency-storm", 0, errors=2)]
    ours = storm("relay-idem-storm", 0)
    assert rows_of([ours, *peers, storm("idemkit-storm", 1)])[label][1] == verdicts.MET
    assert rows_of([ours, *peers, storm("idemkit-storm", 0)])[label][1] == verdicts.TIE
    # Fewer duplicates but more 5xx than a peer is not ahead of it.
    assert rows_of([storm("relay-idem-storm", 0, 5), *peers, storm("idemkit-storm", 1)])[label][1] == verdicts.NOT_MET


def test_throughput_counts_only_2xx_answers() -> None:
    # A layer answering 5xx fast is not fast: 1,200 answers a second, of which 600 are 2xx.
    records = [record("bare", round_no, 1000) for round_no in range(1, 6)]
    records += [record("relay-idem-replay", round_no, 600, 600) for round_no in range(1, 6)]
    measured, verdict = rows_of(records)["same key (replay): ≥ 1.10x the bare app's 2xx/s"]
    assert verdict == verdicts.NOT_MET
    assert measured.startswith("0.60x, 3,000 non-2xx")


def test_no_key_is_judged_from_at_least_five_rounds() -> None:
    label = "no key: ≥ 0.97x the bare app's 2xx/s, ≥ 5 interleaved rounds"

    def nokey(rounds: int, ours: int) -> tuple[str, str]:
        records = [record("bare", n, 1000) for n in range(1, rounds + 1)]
        return rows_of(records + [record("relay-idem-nokey", n, ours) for n in range(1, rounds + 1)])[label]

    assert nokey(5, 990)[1] == verdicts.MET
    assert nokey(4, 990)[1] == verdicts.NOT_JUDGED
    assert nokey(4, 900)[1] == verdicts.NOT_MET  # below the floor is not met, however few the rounds


def proxy(scenario: str, round_no: int, ok: int, cpu: float) -> dict[str, Any]:
    return record(scenario, round_no, ok, executed_per_request=None,
                  cpu_us_per_request={"upstream": 5.0, "proxy": cpu, "redis": 1.0})  # fmt: skip


def test_proxy_verdicts_compare_cpu_with_nginx_and_throughput_with_asgiproxy_in_the_same_round() -> None:
    records = []
    for round_no, load in ((1, 1.0), (2, 2.0)):  # the second round twice as slow: the ratios stay
        records += [
            proxy("proxy-nginx-nokey", round_no, 40_000, 20 * load),
            proxy("proxy-asgiproxy-nokey", round_no, 5000, 190 * load),
            proxy("proxy-relay-idem-nokey", round_no, 20_000, 49 * load),
            proxy("proxy-nginx-first", round_no, 40_000, 20 * load),
            proxy("proxy-relay-idem-first", round_no, 8000, 81 * load),
        ]
    rows = rows_of(records)
    measured, verdict = rows["proxy, no key: CPU per request ≤ 2.5x nginx proxy_pass's"]
    assert verdict == verdicts.MET and measured.startswith("2.5x")  # 2.45x
    assert rows["proxy, unique key (first execution): CPU per request ≤ 4x nginx proxy_pass's"][1] == verdicts.NOT_MET
    assert rows["proxy, no key: ≥ 4x asgiproxy's 2xx/s"][1] == verdicts.MET
    assert rows["proxy, same key (replay): CPU per request ≤ 1.5x nginx proxy_pass's"][1] == verdicts.NOT_MEASURED


def test_only_replaces_the_rerun_groups_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    old = {"environment": {"date": "old"}, "settings": {"rounds": 3},
           "runs": [record("bare", 1, 1000), proxy("proxy-nginx-nokey", 1, 40_000, 20.0)]}  # fmt: skip
    path.write_text(json.dumps(old))
    part = {"groups": ["proxy"], "environment": {"date": "new"}, "settings": {"rounds": 1}}
    merged = cli.merge(path, ["proxy"], part, [proxy("proxy-nginx-nokey", 1, 30_000, 25.0)])
    assert [(r["scenario"], r["load"]["status"]["2xx"]) for r in merged["runs"]] == [
        ("bare", 1000), ("proxy-nginx-nokey", 30_000)
    ]  # fmt: skip
    assert [(p["groups"], p["environment"]["date"]) for p in merged["parts"]] == [
        (["middleware"], "old"), (["proxy"], "new")
    ]  # fmt: skip


def test_the_readme_block_must_exist() -> None:
    with pytest.raises(ValueError, match=r"no .* block"):
        report.replace_block("# README\n", "table")
    text = f"a\n{report.README_BEGIN}\nold\n{report.README_END}\nb\n"
    assert report.replace_block(text, "new") == "a\nnew\nb\n"


def test_the_wait_mode_figure_is_judged_by_its_slowest_waiter() -> None:
    label = "wait mode: a waiting repeat gets the replay within 50 ms of the first request's answer (SPEC §6a)"

    def wake(round_no: int, slowest: float) -> dict[str, Any]:
        measured = {"trials": 20, "waiters": 60, "p50_ms": 1.0, "p99_ms": slowest, "max_ms": slowest, "bound_ms": 50.0}
        return {"scenario": "relay-idem-wake", "target": "relay-idem", "mode": "wake", "workers": 1,
                "round": round_no, "wake": measured}  # fmt: skip

    assert rows_of([wake(1, 3.0), wake(2, 49.0)])[label] == (
        "max 49.0 ms, p50 1.0 ms over 120 waiting repeats (in-process, RedisStore)",
        verdicts.MET,
    )
    assert rows_of([wake(1, 3.0), wake(2, 51.0)])[label][1] == verdicts.NOT_MET
