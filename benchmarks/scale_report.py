"""``benchmarks/scale/``: what ``scripts/measure_scale.py`` measured, as RESULTS.md and as the README's
"Running at scale" figures (the block between the ``scale-figures`` markers), both rendered from
``benchmarks/scale/results.json``.

Each part of results.json (``bytes``, ``cost``, ``failover``, ``faults``) carries the date, git
revision and command of the run that measured it; a run that measures only some parts keeps the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent / "scale"
README_BEGIN = "<!-- scale-figures:begin (python scripts/measure_scale.py; python -m benchmarks --render) -->"
README_END = "<!-- scale-figures:end -->"
KEYS_PER_SECOND = 100  # the README's sizing example: new keys a second, kept for the default --ttl
DEFAULT_TTL_S = 86_400
PARTS = ("bytes", "cost", "failover", "faults")


def load(directory: Path = HERE) -> dict[str, Any]:
    path = directory / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _stamp(part: dict[str, Any]) -> str:
    return f"{part['date']}, git {part['git']}, `{part['command']}`"


def _stamps(document: dict[str, Any]) -> set[str]:
    parts = [document[p] for p in PARTS if p in document and p != "failover"]
    return {_stamp(part) for part in parts + list(document.get("failover", {}).values())}


def _when(part: dict[str, Any], document: dict[str, Any]) -> str:
    """``; <run>`` when the parts come from different runs (otherwise the run is named once, on top)."""
    return f"; {_stamp(part)}" if len(_stamps(document)) > 1 else ""


def _cost_table(cost: dict[str, Any]) -> list[str]:
    lines = ["| request | Redis CPU per request | requests one Redis core takes | one proxy worker served "
             "| proxy workers per Redis |", "|---|---|---|---|---|"]  # fmt: skip
    for mode, what in (("first", "first execution (2 script calls)"), ("replay", "replay (1 script call)")):
        m = cost[mode]
        workers = m["requests_per_redis_core"] / m["requests_per_second"]
        lines.append(
            f"| {what} | {m['redis_cpu_us_per_request']:.1f} µs | ~{m['requests_per_redis_core']:,.0f}/s | "
            f"{m['requests_per_second']:,.0f}/s | ~{workers:.0f} |"
        )
    return lines


def _memory_line(sizes: dict[str, Any]) -> str:
    records = KEYS_PER_SECOND * DEFAULT_TTL_S
    return (
        f"A completed record of a typical small response (202, two headers, a JSON body) takes "
        f"**{sizes['memory_usage']:,} bytes** (`MEMORY USAGE`), `used_memory` grows by "
        f"**~{sizes['used_memory_per_record']:,.0f} bytes per record** over {sizes.get('records', 10_000):,} of them "
        f"(keyspace and expiry "
        f"tables included), and a claim in progress takes {sizes['in_progress']:,} bytes: {KEYS_PER_SECOND} new "
        f"keys a second kept for the default 24 h are ~{records / 1e6:.1f} M records, about "
        f"{records * sizes['used_memory_per_record'] / 1e9:.1f} GB."
    )


def _failover_lines(failover: dict[str, Any], document: dict[str, Any]) -> list[str]:
    """One line per number of replicas, one clause per ``min_replicas``."""
    lines = []
    for replicas, runs in sorted(failover.items()):
        clauses = []
        for name, run in sorted((k, v) for k, v in runs.items() if k.startswith("min_replicas=")):
            clause = f"`{name}`: {run['missing']} of {run['acknowledged']:,} acknowledged completions lost"
            if run["store_errors"]:
                clause += (
                    f", store errors over {run['error_window_s']:.1f} s ({run['store_errors']}, the first "
                    f"{run['first_error_after_failover_s']:.1f} s after the failover)"
                )
            clauses.append(clause)
        count = int(replicas.partition("=")[2])
        when = _when(runs, document).removeprefix("; ")
        name = f"{count} replica" + ("s" if count > 1 else "") + (f" ({when})" if when else "")
        lines.append(f"- {name}: " + "; ".join(clauses) + ".")
    return lines


def _faults_lines(faults: dict[str, Any]) -> list[str]:
    return [
        f"- Redis slow (every reply 1.5 s late): 20 concurrent keyed requests all answered 503 within "
        f"{faults['slow_redis_503_within_s']:.2f} s (the test enforces < {faults['slow_redis_bound_s']:g} s).",
        f"- Redis killed and restarted empty: keyed requests served again {faults['restart_recovery_s']:.2f} s "
        f"after the restart.",
        f"- A proxy SIGKILLed while holding a claim (`--lock-ttl {faults['lock_ttl_s']:g}`): the key was free "
        f"again {faults['sigkill_key_free_after_s']:.2f} s after the kill (the test enforces < "
        f"{faults['sigkill_bound_s']:g} s).",
    ]


def figures(document: dict[str, Any]) -> list[str]:
    """The measured figures, one paragraph or table per part, each with its run."""
    stamps = _stamps(document)
    lines: list[str] = [f"Run: {next(iter(stamps))}.", ""] if len(stamps) == 1 else []
    if "cost" in document:
        lines += ["**Redis CPU per keyed request** (wrk -c32 against `relay-idem proxy`, 1 worker, on a private "
                  f"redis-server{_when(document['cost'], document)}):", "", *_cost_table(document["cost"]),
                  ""]  # fmt: skip
    if "bytes" in document:
        when = _when(document["bytes"], document).removeprefix("; ")
        lines += [f"**Memory**{f' ({when})' if when else ''}: {_memory_line(document['bytes'])}", ""]
    if "failover" in document:
        lines += ["**Forced failover** (`SENTINEL FAILOVER`; a primary, its replicas, three sentinels; one writer at "
                  "~50 claims and completions a second; acknowledged completions the new primary lacks once the old "
                  "one has rejoined):", "", *_failover_lines(document["failover"], document), ""]  # fmt: skip
    if "faults" in document:
        lines += [f"**Faults**, as the tests print them (`--faults` runs them{_when(document['faults'], document)}):",
                  "", *_faults_lines(document["faults"]), ""]  # fmt: skip
    return lines


def markdown(document: dict[str, Any]) -> str:
    lines = [
        "# Redis at scale",
        "",
        "Measured by `python scripts/measure_scale.py [--failover] [--faults]` on a 2-core machine that also ran "
        "wrk, the upstream and Redis: take the ratios as an order of magnitude. The raw numbers are in "
        '[results.json](results.json); the README\'s "Running at scale" figures are rendered from it.',
        "",
        *figures(document),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def readme_block(document: dict[str, Any]) -> str:
    body = figures(document) or ["Not measured yet: run `python scripts/measure_scale.py --failover --faults`."]
    lines = [README_BEGIN, "Measured ([benchmarks/scale/RESULTS.md](benchmarks/scale/RESULTS.md)):", "", *body]
    return "\n".join(lines).rstrip("\n") + "\n" + README_END
