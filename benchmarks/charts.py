"""Optional PNG charts, drawn only when matplotlib is importable.

- ``throughput.png``: median requests/s per scenario and target, min-max as error bars;
- ``p99.png``: the same for p99 latency;
- ``proxy_rss.png``: the proxy's RSS (and requests executed) over the soak.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.grid import Mode

Summary = dict[str, Any]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_charts(summaries: list[Summary], out: Path) -> list[Path]:
    """Write the charts that have data; [] without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    # Storms are left out (their throughput mostly says how fast a layer answers 409), and so is the soak.
    measured = [s for s in summaries if s["rps"] is not None and s["mode"] in (Mode.FIRST, Mode.REPLAY, Mode.NOKEY)]
    if measured:
        rps_label, p99_label = "requests/s (median, min-max)", "p99 latency, ms (median, min-max)"
        written.append(_bars(plt, measured, "rps", rps_label, "Throughput (higher is better)", out / "throughput.png"))
        written.append(_bars(plt, measured, "p99_ms", p99_label, "p99 latency (lower is better)", out / "p99.png"))
    soaks = [s for s in summaries if s["soak"] is not None and s["soak"]["samples"]]
    if soaks:
        written.append(_rss(plt, soaks[-1], out / "proxy_rss.png"))
    return written


def _bars(plt: Any, measured: list[Summary], field: str, ylabel: str, title: str, path: Path) -> Path:
    """Grouped bars: one group per mode, one bar per target (bare: its plain run in every group)."""
    targets = list(dict.fromkeys(s["target"] for s in measured))
    modes = [str(mode) for mode in Mode if any(s["mode"] == mode for s in measured)]
    cells = {(s["target"], s["mode"]): s for s in measured}
    width = 0.8 / len(targets)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(modes) + 2), 4.5))
    for index, target in enumerate(targets):
        xs, heights, low, high = [], [], [], []
        for position, mode in enumerate(modes):
            summary = cells.get((target, mode))
            if summary is None and target == "bare":
                summary = cells.get(("bare", str(Mode.NOKEY)))
            if summary is None or summary[field] is None:
                continue
            spread = summary[field]
            xs.append(position + (index - (len(targets) - 1) / 2) * width)
            heights.append(spread["median"])
            low.append(spread["median"] - spread["min"])
            high.append(spread["max"] - spread["median"])
        ax.bar(xs, heights, width, yerr=[low, high], capsize=3, label=target)
    ax.set_xticks(range(len(modes)), [Mode(mode).description for mode in modes], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title + "; bare: the same plain run in each group", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _rss(plt: Any, summary: Summary, path: Path) -> Path:
    soak = summary["soak"]
    seconds = [sample[0] for sample in soak["samples"]]
    rss = [sample[1] for sample in soak["samples"]]
    done = [sample[2] for sample in soak["samples"]]
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    ax.plot(seconds, rss, color="tab:blue", marker=".", label="proxy RSS (MB)")
    limit = soak["rss_start_mb"] + 20
    ax.axhline(limit, color="tab:red", linestyle="--", linewidth=1, label="start + 20 MB (SPEC §7)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, MB (all proxy processes)")
    ax.set_ylim(0, max(max(rss), limit) * 1.1)
    requests = ax.twinx()
    requests.plot(seconds, done, color="tab:gray", linewidth=1, label="requests executed")
    requests.set_ylabel("requests executed")
    lines = ax.get_legend_handles_labels()
    more = requests.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")
    ax.set_title(f"Proxy RSS over {summary['requests']:,} unique-key requests", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
