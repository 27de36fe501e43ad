"""Smoke test of the benchmark harness (benchmarks/): every scenario runs and produces numbers.

Every scenario of every middleware target in quick mode: storms with 1 and 2 workers, a small proxy
soak, part of the proxy group (nginx, asgiproxy, relay-idem's proxy with 1 and 2 workers), the SPEC §7
targets table and the charts. No thresholds: timing belongs to ``python -m benchmarks``, not to the
test suite.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import charts, grid, procs, report, verdicts
from benchmarks.load.wrk import parse_output
from benchmarks.monitor import count_lines

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120
SOAK_REQUESTS = 2000
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not on PATH")
needs_nginx = pytest.mark.skipif(procs.nginx_path() is None, reason="nginx not installed")


def run_harness(out: Path, *args: str) -> dict[str, object]:
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "--quick",
        "--soak-requests",
        str(SOAK_REQUESTS),
        "--out",
        str(out),
        *args,
    ]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert (out / "results.json").is_file()
    assert (out / "RESULTS.md").is_file()
    document: dict[str, object] = json.loads((out / "results.json").read_text())
    return document


def assert_numbers(document: dict[str, object], expected: list[str]) -> None:
    runs = document["runs"]
    assert isinstance(runs, list)
    assert sorted(run["scenario"] for run in runs) == sorted(expected)
    for run in runs:
        assert "error" not in run, run
        if run["mode"] == "wake":  # in-process, no load
            assert run["wake"]["waiters"] > 0 and 0 < run["wake"]["p50_ms"] <= run["wake"]["max_ms"], run
            continue
        load = run["load"]
        assert load["requests"] > 0, run
        assert load["rps"] > 0, run
        assert load["p50_ms"] > 0 and load["p99_ms"] >= load["p50_ms"], run
        if run["scenario"].startswith("proxy-"):  # the fast upstream counts nothing; the proxy's CPU is apart
            assert run["executed_per_request"] is None, run
            assert set(run["cpu_us_per_request"]) == {"upstream", "proxy", "redis"}, run
        else:
            assert run["executed_per_request"] is not None, run
            assert set(run["cpu_us_per_request"]) >= {"app", "redis"}, run
        if run["mode"] == "storm":
            assert run["storm"]["keys"] > 0, run
            assert run["storm"]["executions"] == run["executed"], run
        if run["mode"] == "soak":
            soak = run["soak"]
            assert soak["requests_target"] == SOAK_REQUESTS
            assert run["executed"] >= SOAK_REQUESTS, run
            assert len(soak["samples"]) >= 2 and soak["rss_start_mb"] > 0, run
            assert soak["rss_max_mb"] >= max(soak["rss_start_mb"], soak["rss_end_mb"]), run
    out = Path(str(document["settings"]["out_dir"]))  # type: ignore[index]
    markdown = (out / "RESULTS.md").read_text()
    for name in expected:
        assert f"| {name} |" in markdown or name.endswith("-wake")
    # The SPEC §7 targets table comes first, whatever was selected; the See also list comes last.
    assert markdown.index("## SPEC §7 targets") < markdown.index("## The run") < markdown.index("## Details")
    for label, _, verdict in verdicts.target_rows(document["summary"]):  # type: ignore[arg-type]
        assert f"| {label} |" in markdown and verdict in verdicts.VERDICTS
    assert markdown.rstrip().splitlines()[-1].startswith(f"- [benchmarks/{report.SEE_ALSO[-1][0]}]")
    if HAS_MATPLOTLIB:
        for chart in charts.chart_names(document["summary"]):  # type: ignore[arg-type]
            assert (out / chart).stat().st_size > 0
            assert f"]({chart})" in markdown


@pytest.mark.slow
@needs_redis_server
@pytest.mark.parametrize(
    "target", ["bare", "asgi-idempotency-header", "fastapi-idempotency", "idemkit", "relay-idem", "relay-idem-proxy"]
)
def test_quick_run_gives_numbers_for_every_scenario(tmp_path: Path, target: str) -> None:
    (chosen,) = [t for t in grid.TARGETS if t.name == target]
    if chosen.missing():
        pytest.skip(f"{target} needs {chosen.missing()}: pip install -r benchmarks/requirements.txt")
    expected = [s.name for s in grid.all_scenarios() if s.target is chosen]
    document = run_harness(tmp_path, "--scenarios", ",".join(expected))
    assert_numbers(document, expected)
    for run in document["runs"]:  # type: ignore[attr-defined]
        assert run["workers"] == (2 if run["scenario"].endswith("-w2") else 1)
        if chosen.redis_commands and run["mode"] not in ("storm", "soak", "wake"):
            assert run["redis_commands"]["requests"] > 0
            assert run["redis_commands"]["non_2xx"] == 0
        if run["scenario"] == "bare":
            assert run["redis_commands"]["per_request"] == 0


# The proxy group in part: every proxy, relay-idem's with 1 and 2 workers and in every mode (Redis commands).
PROXY_SCENARIOS = ["proxy-nginx-nokey", "proxy-asgiproxy-nokey", "proxy-relay-idem-nokey", "proxy-relay-idem-replay",
                   "proxy-relay-idem-first-w2"]  # fmt: skip


@pytest.mark.slow
@needs_redis_server
@needs_nginx
def test_quick_proxy_group_gives_cpu_per_request_and_verdicts(tmp_path: Path) -> None:
    missing = {name for t in grid.TARGETS if t.fast_upstream for name in t.missing()}
    if missing:
        pytest.skip(f"needs {sorted(missing)}: pip install -r benchmarks/requirements.txt")
    document = run_harness(tmp_path, "--only", "proxy", "--scenarios", ",".join(PROXY_SCENARIOS))
    assert_numbers(document, PROXY_SCENARIOS)
    runs = {run["scenario"]: run for run in document["runs"]}  # type: ignore[attr-defined]
    assert runs["proxy-relay-idem-first-w2"]["redis_commands"]["per_request"] == 2
    assert runs["proxy-relay-idem-replay"]["redis_commands"]["per_request"] == 1
    assert runs["proxy-relay-idem-nokey"]["redis_commands"]["per_request"] == 0
    assert runs["proxy-relay-idem-first-w2"]["workers"] == 2
    assert all(run["load"]["non_2xx"] == 0 for run in runs.values())
    rows = {label: verdict for label, _, verdict in verdicts.target_rows(document["summary"])}  # type: ignore[arg-type]
    assert rows["proxy, no key: ≥ 4x asgiproxy's 2xx/s"] in {verdicts.MET, verdicts.NOT_MET}
    assert "## Proxy, against nginx" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.slow
@needs_redis_server
def test_builtin_load_generator(tmp_path: Path) -> None:
    document = run_harness(tmp_path, "--scenarios", "bare", "--loadgen", "python")
    assert_numbers(document, ["bare"])
    assert document["runs"][0]["load"]["generator"] == "python"  # type: ignore[index]


def test_wrk_result_line_is_parsed() -> None:
    stdout = (
        "Running 1s test @ http://127.0.0.1:1/v1/messages\n"
        'BENCH_RESULT {"requests": 1000, "duration_us": 1000000, "sent": 1032, "p50_us": 2900, "p90_us": 4000, '
        '"p99_us": 7900, "max_us": 9000, "mean_us": 3000.5, "errors": {"connect": 0, "read": 1, "write": 0, '
        '"status": 7, "timeout": 0}, "status": {"2xx": 990, "3xx": 0, "409": 3, "4xx": 2, "5xx": 5}}\n'
    )
    result = parse_output(stdout)
    assert result.rps == 1000
    assert result.p99_ms == 7.9
    assert result.non_2xx == 10
    assert result.errors == {"connect": 0, "read": 1, "write": 0, "timeout": 0}


def test_monitor_lines_inside_lua_are_not_counted() -> None:
    lines = [
        '1732737000.100000 [0 127.0.0.1:5000] "EVALSHA" "abc" "1" "k"',
        '1732737000.100001 [0 lua] "get" "k"',
        '1732737000.100002 [0 lua] "set" "k" "v"',
        '1732737000.100003 [0 127.0.0.1:5000] "GET" "k"',
        '1732737000.100004 [0 127.0.0.1:5001] "CLIENT" "SETINFO" "LIB-NAME" "redis-py"',
        '1732737000.100005 [0 127.0.0.1:9999] "ECHO" "end"',
    ]
    counted = count_lines(lines, requests=2, ignore_clients=["127.0.0.1:9999"])
    assert counted.per_request == 1.0
    assert counted.commands == {"evalsha": 1, "get": 1}
    assert counted.lua == 2
    assert counted.setup == {"client": 1}


def test_scenario_selection() -> None:
    default = grid.select(None)
    assert default[0].name == "bare"
    assert [s for s in grid.all_scenarios() if s.target.enabled] == default
    assert [s.name for s in grid.select("relay-idem-first")] == ["relay-idem-first"]
    assert [s.name for s in grid.select("bare")] == ["bare"]
    assert len(grid.select("fastapi-idempotency")) == 5
    assert {s.group for s in grid.select(None, "proxy")} == {grid.Group.PROXY}
    assert [s.name for s in grid.select("*nokey*", "proxy")] == [
        "proxy-nginx-nokey", "proxy-asgiproxy-nokey", "proxy-relay-idem-nokey", "proxy-relay-idem-nokey-w2"
    ]  # fmt: skip
    (first,) = grid.select("proxy-asgiproxy-first")
    assert first.baseline == "proxy-nginx-first"
    assert [s.name for s in grid.select("bare*")] == ["bare", "bare-storm", "bare-storm-w2"]
    # Storms run with 1 and 2 workers against the bare storm with as many; the proxy soak has no baseline.
    (storm_w2,) = grid.select("relay-idem-storm-w2")
    assert (storm_w2.workers, storm_w2.baseline) == (2, "bare-storm-w2")
    assert [(s.name, s.baseline) for s in grid.select("*-soak")] == [("relay-idem-proxy-soak", None)]
    with pytest.raises(ValueError, match="no scenario matches"):
        grid.select("nope")
    with pytest.raises(ValueError, match="unknown group"):
        grid.select(None, "proxies")


@pytest.mark.slow
def test_the_hot_path_benchmark_serves_each_app_and_prints_its_cpu_per_request() -> None:
    # benchmarks/README.md "The hot path": uvicorn's protocol fed from memory; no Redis needed without a key.
    apps = ["benchmarks.apps.bare:app", "benchmarks.apps.relay_idem_middleware:app"]
    command = [sys.executable, "-m", "benchmarks.hotpath", "--mode", "nokey", "--rounds", "2", "--requests", "200"]
    done = subprocess.run([*command, *apps], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == apps
    assert all("µs CPU/request" in line for line in lines)
