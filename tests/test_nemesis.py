"""The nemesis (issue 12): its checker catches each violation it judges, and a short run works end to end."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.nemesis.checker import Execution, check
from benchmarks.nemesis.client import Attempt, key_for
from benchmarks.nemesis.faults import Fault, Nemesis
from benchmarks.nemesis.system import LogLine
from relay_idem.problems import KEY_IN_PROGRESS, STORE_UNAVAILABLE, UPSTREAM_FAILED

KEY = key_for(7, 1)
CREATED = [("content-type", "application/json"), ("x-nemesis-upstream", "1")]


def answer(status: int, body: bytes, started: float, *, headers: list[tuple[str, str]] | None = None) -> Attempt:
    return Attempt(KEY, "retry", 0, started, started + 0.1, status, headers if headers is not None else CREATED, body)


def problem(status: int, kind: str) -> bytes:
    return json.dumps({"type": kind, "status": status}).encode()


PROBLEM = [("content-type", "application/problem+json")]


def judged(
    history: list[Attempt],
    executions: Sequence[Execution] = (),
    *,
    logs: Sequence[LogLine] = (),
    faults: Sequence[Fault] = (),
    min_replicas: int = 0,
    stuck: Sequence[str] = (),
) -> dict[str, int]:
    verdict = check("test", min_replicas, history, list(executions), list(logs), list(faults), list(stuck), [])
    return {name: len(found) for name, found in verdict.violations.items() if found}


def test_keys_carry_a_unique_four_character_hint() -> None:
    assert len({key_for(index, 3)[:4] for index in range(100_000)}) == 100_000


def test_a_clean_history_has_no_violation() -> None:
    history = [
        answer(503, problem(503, STORE_UNAVAILABLE.type), 1.0, headers=PROBLEM),
        answer(409, problem(409, KEY_IN_PROGRESS.type), 2.0, headers=PROBLEM),
        answer(201, b'{"execution": "a"}', 3.0),
        answer(201, b'{"execution": "a"}', 5.0, headers=[*CREATED, ("idempotent-replayed", "true")]),
        answer(503, problem(503, STORE_UNAVAILABLE.type), 6.0, headers=PROBLEM),  # retryable after the 2xx
    ]
    assert judged(history, [Execution(KEY, 2.5, 0, 503), Execution(KEY, 3.0, 0, 201)]) == {}


def test_a_second_execution_without_an_explanation_is_a_violation() -> None:
    history = [answer(201, b'{"execution": "a"}', 3.0), answer(201, b'{"execution": "b"}', 9.0)]
    executions = [Execution(KEY, 3.0, 0, 201), Execution(KEY, 9.0, 1, 201)]
    assert judged(history, executions) == {"executed once": 1, "replay": 1}


def test_a_duplicate_is_explained_by_a_store_failure_logged_for_its_key_unless_min_replicas() -> None:
    history = [answer(201, b'{"execution": "a"}', 3.0), answer(201, b'{"execution": "b"}', 9.0)]
    executions = [Execution(KEY, 3.0, 0, 201), Execution(KEY, 9.0, 1, 201)]
    line = f"WARNING: relay-idem: could not store the outcome (x); a retry will execute again (key {KEY[:4]}…)"
    logs = [LogLine(3.2, "proxy0", line)]
    other_key = [LogLine(3.2, "proxy0", line.replace(KEY[:4], "zzzz"))]
    assert judged(history, executions, logs=logs) == {}
    assert judged(history, executions, logs=other_key) == {"executed once": 1, "replay": 1}
    assert judged(history, executions, logs=logs, min_replicas=1) == {"executed once": 1, "replay": 1}


def test_the_first_owners_refused_write_logged_after_the_second_run_explains_it() -> None:
    """Seen in a 10-minute run: Redis was down longer than lock_ttl while the first owner retried its
    outcome write; a retry claimed the expired key and ran; then the first owner's write was refused."""
    executions = [Execution(KEY, 3.0, 0, 201), Execution(KEY, 6.5, 0, 201)]
    line = f"WARNING: relay-idem: lease lost; a newer owner holds the key, outcome not stored (key {KEY[:4]}…)"
    assert judged([], executions, logs=[LogLine(6.6, "proxy0", line)]) == {}
    assert judged([], executions, logs=[LogLine(100.0, "proxy0", line)]) == {"executed once": 1}


def test_a_duplicate_is_explained_by_the_owner_process_losing_a_worker_meanwhile() -> None:
    executions = [Execution(KEY, 3.0, 0, 201), Execution(KEY, 9.0, 1, 201)]
    killed = Fault("worker SIGKILL", 3.1, 3.1, proxy=0)
    elsewhere = Fault("worker SIGKILL", 3.1, 3.1, proxy=1)
    before = Fault("worker SIGKILL", 2.0, 2.0, proxy=0)
    assert judged([], executions, faults=[killed]) == {}
    assert judged([], executions, faults=[elsewhere, before]) == {"executed once": 1}


def test_an_answer_after_the_first_2xx_must_be_it_or_retryable() -> None:
    first = answer(201, b'{"execution": "a"}', 3.0)
    other_headers = answer(201, b'{"execution": "a"}', 5.0, headers=[("content-type", "text/plain")])
    final_502 = answer(502, problem(502, UPSTREAM_FAILED.type), 6.0, headers=PROBLEM)
    assert judged([first, other_headers], [Execution(KEY, 3.0, 0, 201)]) == {"replay": 1}
    assert judged([first, final_502], [Execution(KEY, 3.0, 0, 201)]) == {"replay": 1}


def test_every_5xx_is_the_upstreams_own_or_a_documented_problem() -> None:
    history = [
        answer(500, b"Internal Server Error", 1.0, headers=[("content-type", "text/plain")]),
        answer(502, problem(502, "tag:elsewhere,2026:oops"), 2.0, headers=PROBLEM),
        answer(503, problem(503, "tag:nemesis,2026:busy"), 3.0),  # the upstream's own
        answer(502, problem(502, UPSTREAM_FAILED.type), 4.0, headers=PROBLEM),
    ]
    assert judged(history) == {"5xx problem": 2}


def test_stuck_records_are_violations() -> None:
    assert judged([], stuck=["nemesis:abc"]) == {"stuck": 1}


def test_faults_narrows_the_fault_kinds_to_those_naming_it() -> None:
    system: Any = SimpleNamespace(sentinel=None, configuration="standalone")
    everything = Nemesis(system, random.Random(1))
    redis_only = Nemesis(system, random.Random(1), only="redis")
    assert set(redis_only.kinds) == {kind for kind in everything.kinds if "redis" in kind.lower()}
    assert 0 < len(redis_only.kinds) < len(everything.kinds)
    with pytest.raises(ValueError, match="no fault kind"):
        Nemesis(system, random.Random(1), only="meteor")


@pytest.mark.slow
def test_a_short_nemesis_run_judges_a_history_and_prints_the_table_last() -> None:
    """Both configurations, 9 s of traffic and faults each; the exit status follows the verdict."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.nemesis", "--minutes", "0.3", "--seed", "12", "--retry-budget", "15"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = result.stdout.strip().splitlines()
    table = lines[lines.index("| | sentinel | standalone |") :]
    assert table[-1].startswith("| verdict |"), result.stdout[-2000:] + result.stderr[-2000:]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    assert all(int(count) > 0 for count in rows["logical requests"])
    faults = [int(cell.split()[0]) for name, cells in rows.items() if name.startswith("fault:") for cell in cells]
    assert sum(faults) > 0
    assert result.returncode == (0 if rows["verdict"] == ["ok", "ok"] else 1), result.stdout[-3000:]
    print("\n".join(lines[-len(table) - 2 :]))
