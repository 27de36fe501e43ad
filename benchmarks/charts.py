"""Optional PNG charts, drawn only when matplotlib is importable.

- ``throughput.png``: median requests/s per scenario and target, min-max as error bars;
- ``p99.png``: the same for p99 latency;
- ``proxy_cpu.png``: the proxy group: CPU per request of each proxy's processes, and 2xx/s;
- ``proxy_rss.png``: the proxy's RSS (and requests executed) over the soak.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.grid import Group, Mode

Summary = dict[str, Any]
BAR_MODES = (Mode.FIRST, Mode.REPLAY, Mode.NOKEY)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _bar_summaries(summaries: list[Summary]) -> list[Summary]:
    # Storms are left out (their throughput mostly says how fast a layer answers 409), and so are the soak
    # and the proxy group (its own chart).
    return [s for s in summaries if s["rps"] is not None and s["mode"] in BAR_MODES and s["group"] == Group.MIDDLEWARE]


def _proxy_summaries(summaries: list[Summary]) -> list[Summary]:
    return [s for s in summaries if s["group"] == Group.PROXY and s["proxy_cpu_us_per_request"] is not None]


def _soak_summaries(summaries: list[Summary]) -> list[Summary]:
    return [s for s in summaries if s["soak"] is not None and s["soak"]["samples"]]


def chart_names(summaries: list[Summary]) -> list[str]:
    """The charts ``write_charts`` draws for these summaries (RESULTS.md links them, with or without matplotlib)."""
    names = ["throughput.png", "p99.png"] if _bar_summaries(summaries) else []
    names += ["proxy_cpu.png"] if _proxy_summaries(summaries) else []
    return names + (["proxy_rss.png"] if _soak_summaries(summaries) else [])


def write_charts(summaries: list[Summary], out: Path) -> list[Path]:
    """Write the charts that have data; [] without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    measured = _bar_summaries(summaries)
    if measured:
        rps_label, p99_label = "2xx answers/s (median, min-max)", "p99 latency, ms (median, min-max)"
        written.append(_bars(plt, measured, "rps", rps_label, "Throughput (higher is better)", out / "throughput.png"))
        written.append(_bars(plt, measured, "p99_ms", p99_label, "p99 latency (lower is better)", out / "p99.png"))
    proxies = _proxy_summaries(summaries)
    if proxies:
        written.append(_proxy_cpu(plt, proxies, out / "proxy_cpu.png"))
    soaks = _soak_summaries(summaries)
    if soaks:
        written.append(_rss(plt, soaks[-1], out / "proxy_rss.png"))
    return written


def _proxy_cpu(plt: Any, proxies: list[Summary], path: Path) -> Path:
    """Two panels, one group of bars per mode: CPU µs per request of each proxy, and its 2xx/s."""
    series = list(dict.fromkeys((s["target"], s["workers"]) for s in proxies))
    modes = [str(mode) for mode in (Mode.NOKEY, Mode.FIRST, Mode.REPLAY) if any(s["mode"] == mode for s in proxies)]
    cells = {(s["target"], s["workers"], s["mode"]): s for s in proxies}
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.5))
    panels = (("proxy_cpu_us_per_request", "CPU µs per request, proxy processes (lower is better)"),
              ("rps", "2xx answers/s (higher is better)"))  # fmt: skip
    for ax, (field, title) in zip(axes, panels, strict=True):
        for index, (target, workers) in enumerate(series):
            label = target.removeprefix("proxy-") + (f" ({workers} workers)" if workers > 1 else "")
            row = [cells.get((target, workers, mode)) for mode in modes]
            _series(ax, row, field, index - (len(series) - 1) / 2, width, label)
        ax.set_xticks(range(len(modes)), [Mode(mode).description for mode in modes], fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("Proxies in front of the same nginx fast upstream (median, min-max over rounds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(ax: Any, row: list[Summary | None], field: str, offset: float, width: float, label: str) -> None:
    """A bar at each group position (``row[i]`` at i, shifted by ``offset`` bar widths), min-max as error bars."""
    xs, heights, low, high = [], [], [], []
    for position, summary in enumerate(row):
        if summary is None or summary[field] is None:
            continue
        spread = summary[field]
        xs.append(position + offset * width)
        heights.append(spread["median"])
        low.append(spread["median"] - spread["min"])
        high.append(spread["max"] - spread["median"])
    ax.bar(xs, heights, width, yerr=[low, high], capsize=3, label=label)


def _bars(plt: Any, measured: list[Summary], field: str, ylabel: str, title: str, path: Path) -> Path:
    """Grouped bars: one group per mode, one bar per target (bare: its plain run in every group)."""
    targets = list(dict.fromkeys(s["target"] for s in measured))
    modes = [str(mode) for mode in Mode if any(s["mode"] == mode for s in measured)]
    cells = {(s["target"], s["mode"]): s for s in measured}
    width = 0.8 / len(targets)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(modes) + 2), 4.5))
    for index, target in enumerate(targets):
        row = [cells.get((target, mode)) for mode in modes]
        if target == "bare":  # its plain run in every group
            row = [summary or cells.get(("bare", str(Mode.NOKEY))) for summary in row]
        _series(ax, row, field, index - (len(targets) - 1) / 2, width, target)
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
