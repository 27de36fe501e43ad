"""The checker: judges the whole history of one run against the invariants, and prints the table.

Invariants (issue 12):

- ``executed once``: a key's app ran at most once with a final status (the upstream's own 503 is
  "not processed": the proxy releases the key and a retry runs it again, as SPEC §3.6 says),
  unless the duplicate is explained at the time, by key: a proxy logged a store failure or a lost
  lease for that key (between the first execution and the end of the first owner's outcome-write
  retries), or the proxy process that ran the first execution had a worker killed or
  stopped meanwhile (SPEC §3.8: the claim of a dead owner expires after ``lock_ttl`` and the
  retry executes). With ``--min-replicas 1`` a duplicate explained by a store failure is still
  counted as a violation: that configuration promises none.
- ``replay``: every 2xx a client got for a key after its first 2xx is that 2xx, byte for byte
  (status, headers but ``Idempotent-Replayed``, body); and every answer to an attempt sent after
  it is that 2xx, or a retryable relay-idem answer (409 in progress, 503 store unavailable) or a
  connection error — which the client retries until it gets the replay.
- ``5xx problem``: every 5xx is the upstream's own, or a problem+json of a type relay-idem
  documents (``relay_idem/problems.py``, README "Problem types").
- ``stuck``: once traffic and faults stop, every record still in progress is gone within
  ``lock_ttl`` plus the proxies' outcome-write retry window (``complete_retry``, 30 s).
- ``proxy restart``: both proxy processes are alive and ready at the end; none was restarted.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.nemesis.client import Attempt, Client
from benchmarks.nemesis.faults import Fault
from benchmarks.nemesis.system import LOCK_TTL, LogLine
from relay_idem import problems

DOCUMENTED_TYPES = frozenset(value.type for value in vars(problems).values() if isinstance(value, problems.Problem))
RETRYABLE_TYPES = frozenset({problems.KEY_IN_PROGRESS.type, problems.STORE_UNAVAILABLE.type})
STORE_FAILURE_LINES = ("could not store the outcome", "could not release", "lease renewal failed", "lease lost")
LOG_AFTER = LOCK_TTL + 30.0 + 5.0  # the lease, the outcome-write retry window (complete_retry), slack
INVARIANTS = ("executed once", "replay", "5xx problem", "stuck", "proxy restart")


@dataclass(frozen=True, slots=True)
class Execution:
    key: str
    t: float
    proxy: int
    status: int


@dataclass
class Verdict:
    configuration: str
    violations: dict[str, list[str]] = field(default_factory=lambda: {name: [] for name in INVARIANTS})
    explained: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    unexecuted_final: list[str] = field(default_factory=list)  # final 502/504 the upstream never ran
    final_types: Counter[str] = field(default_factory=Counter)  # the 5xx a client gave up on, by type
    answer_types: Counter[str] = field(default_factory=Counter)  # every 5xx, by type

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


def read_executions(path: Path, proxy_of_port: dict[int, int]) -> list[Execution]:
    executions = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                executions.append(Execution(item["key"], item["t"], proxy_of_port[item["port"]], item["status"]))
    return executions


def explain(first: Execution, again: Execution, logs: list[LogLine], faults: list[Fault]) -> str | None:
    """Why ``again`` ran after ``first`` had already run, from what was recorded at the time; None if nothing."""
    hint = f"key {first.key[:4]}"
    for line in logs:
        # The first owner may log its refused or abandoned outcome write after the second ran:
        # it retries the write for up to complete_retry (SPEC §3.8).
        if first.t - 1 <= line.t <= again.t + LOG_AFTER and hint in line.text:
            for phrase in STORE_FAILURE_LINES:
                if phrase in line.text:
                    return f"logged: {phrase}"
    for fault in faults:
        ended = fault.ended if fault.ended is not None else again.t
        if fault.proxy == first.proxy and fault.error is None and fault.started <= again.t and ended >= first.t:
            if fault.kind.startswith("worker SIGKILL") and fault.started >= first.t:
                return "owner's worker SIGKILLed (claim expired after lock_ttl)"
            if fault.kind.startswith("worker SIGSTOP"):
                return "owner's worker SIGSTOPped (lease lost, or the worker was replaced)"
    return None


def check(
    configuration: str,
    min_replicas: int,
    history: list[Attempt],
    executions: list[Execution],
    logs: list[LogLine],
    faults: list[Fault],
    stuck: list[str],
    unhealthy: list[str],
) -> Verdict:
    verdict = Verdict(configuration)
    final: dict[str, list[Execution]] = defaultdict(list)
    for execution in sorted(executions, key=lambda e: e.t):
        if execution.status != 503:
            final[execution.key].append(execution)
    for key, runs in final.items():
        for again in runs[1:]:
            verdict.duplicates += 1
            reason = explain(runs[0], again, logs, faults)
            if reason is None or (min_replicas and reason.startswith("logged")):
                verdict.violations["executed once"].append(
                    f"{key}: ran at {runs[0].t:.3f} and {again.t:.3f} ({reason})"
                )
            else:
                verdict.explained[reason] += 1
    by_key: dict[str, list[Attempt]] = defaultdict(list)
    for attempt in history:
        by_key[attempt.key].append(attempt)
        if attempt.status is not None and attempt.status >= 500:
            verdict.answer_types[problem_type(attempt)] += 1
            if not documented(attempt):
                verdict.violations["5xx problem"].append(f"{attempt.key}: {attempt.status} {attempt.body[:120]!r}")
    duplicated = {key for key, runs in final.items() if len(runs) > 1}
    unexplained = {violation.partition(":")[0] for violation in verdict.violations["executed once"]}
    for key, attempts in by_key.items():
        found = check_replays(key, attempts)
        if found and key in duplicated and key not in unexplained:
            verdict.explained["a later 2xx differs: the explained duplicate's answer"] += len(found)
        else:
            verdict.violations["replay"] += found
        last = max((a for a in attempts if a.status is not None), key=lambda a: a.ended, default=None)
        if last is not None and last.status in (502, 504) and key not in final and key not in duplicated:
            verdict.unexecuted_final.append(key)
        if last is not None and last.status is not None and last.status >= 500:
            verdict.final_types[problem_type(last)] += 1
    verdict.violations["stuck"] = [f"{name} still in progress" for name in stuck]
    verdict.violations["proxy restart"] = list(unhealthy)
    return verdict


def documented(attempt: Attempt) -> bool:
    if attempt.header("x-nemesis-upstream") == "1":
        return True
    if attempt.header("content-type") != "application/problem+json":
        return False
    try:
        return json.loads(attempt.body).get("type") in DOCUMENTED_TYPES
    except ValueError:
        return False


def comparable(attempt: Attempt) -> tuple[int | None, list[tuple[str, str]], bytes]:
    return attempt.status, [(n, v) for n, v in attempt.headers if n != "idempotent-replayed"], attempt.body


def check_replays(key: str, attempts: list[Attempt]) -> list[str]:
    answered = sorted((a for a in attempts if a.status is not None), key=lambda a: a.ended)
    first = next((a for a in answered if 200 <= (a.status or 0) < 300), None)
    found: list[str] = []
    if first is None:
        return found
    for attempt in answered:
        if attempt is first or attempt.ended < first.ended:
            continue
        if 200 <= (attempt.status or 0) < 300:
            if comparable(attempt) != comparable(first):
                found.append(f"{key}: a 2xx differs from the first: {attempt.body[:80]!r}")
        elif attempt.started >= first.ended and not retryable_problem(attempt):
            found.append(f"{key}: {attempt.status} after its 2xx: {attempt.body[:80]!r}")
    return found


def problem_type(attempt: Attempt) -> str:
    """The problem type's last part, "upstream's own" or the status."""
    if attempt.header("x-nemesis-upstream") == "1":
        return f"{attempt.status} upstream's own"
    try:
        return f"{attempt.status} " + str(json.loads(attempt.body).get("type", "?")).rpartition("/")[2]
    except ValueError:
        return f"{attempt.status} (not JSON)"


def retryable_problem(attempt: Attempt) -> bool:
    try:
        return bool(json.loads(attempt.body).get("type") in RETRYABLE_TYPES)
    except ValueError:
        return False


def table(verdicts: list[Verdict], clients: list[Client], faults: list[list[Fault]], minutes: list[float]) -> str:
    """The run, as Markdown: one column per configuration."""
    names = [v.configuration for v in verdicts]
    rows: list[tuple[str, list[str]]] = [("minutes", [f"{m:.1f}" for m in minutes])]
    rows.append(("logical requests", [str(c.logical) for c in clients]))
    rows.append(("attempts", [str(len(c.history)) for c in clients]))
    for label, test in (
        ("answers 2xx", lambda a: a.status is not None and a.status < 300),
        ("answers 409", lambda a: a.status == 409),
        ("answers 5xx", lambda a: a.status is not None and a.status >= 500),
        ("connection errors / timeouts", lambda a: a.status is None),
    ):
        rows.append((label, [str(sum(1 for a in c.history if test(a))) for c in clients]))
    for kind in sorted({t for v in verdicts for t in v.answer_types}):
        rows.append((f"  5xx {kind}", [str(v.answer_types[kind]) for v in verdicts]))
    rows.append((f"gave up after {clients[0].retry_budget:g} s of retries", [str(len(c.gave_up)) for c in clients]))
    for kind in sorted({t for v in verdicts for t in v.final_types}):
        rows.append((f"  last answer {kind}", [str(v.final_types[kind]) for v in verdicts]))
    rows.append(("  of those, 502/504 the upstream never ran", [str(len(v.unexecuted_final)) for v in verdicts]))
    kinds = sorted({f.kind for run in faults for f in run})
    for kind in kinds:
        cells = []
        for run in faults:
            applied = [f for f in run if f.kind == kind]
            failed = sum(1 for f in applied if f.error)
            cells.append(f"{len(applied)}" + (f" ({failed} not applicable)" if failed else ""))
        rows.append((f"fault: {kind}", cells))
    rows.append(("duplicate executions", [str(v.duplicates) for v in verdicts]))
    reasons = sorted({r for v in verdicts for r in v.explained})
    for reason in reasons:
        rows.append((f"  explained: {reason}", [str(v.explained[reason]) for v in verdicts]))
    for invariant in INVARIANTS:
        rows.append((f"violations: {invariant}", [str(len(v.violations[invariant])) for v in verdicts]))
    rows.append(("verdict", ["ok" if v.ok else "VIOLATED" for v in verdicts]))
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)
