"""Optional PNG charts, drawn only when matplotlib is importable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.grid import Mode


def write_charts(summaries: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write throughput.png (median rps per mode and target, min-max as error bars); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []

    # Storms are left out: their throughput mostly says how fast a layer answers 409.
    measured = [s for s in summaries if s["rps"] is not None and s["mode"] != Mode.STORM]
    if not measured:
        return []
    targets = list(dict.fromkeys(s["target"] for s in measured))
    modes = [str(mode) for mode in Mode if mode is not Mode.STORM and any(s["mode"] == mode for s in measured)]
    cells = {(s["target"], s["mode"]): s for s in measured}
    width = 0.8 / len(targets)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(modes) + 2), 4.5))
    for index, target in enumerate(targets):
        xs, heights, low, high = [], [], [], []
        for position, mode in enumerate(modes):
            summary = cells.get((target, mode))
            if summary is None and target == "bare":
                summary = cells.get(("bare", str(Mode.NOKEY)))
            if summary is None:
                continue
            rps = summary["rps"]
            xs.append(position + (index - (len(targets) - 1) / 2) * width)
            heights.append(rps["median"])
            low.append(rps["median"] - rps["min"])
            high.append(rps["max"] - rps["median"])
        ax.bar(xs, heights, width, yerr=[low, high], capsize=3, label=target)
    ax.set_xticks(range(len(modes)), [Mode(mode).description for mode in modes], fontsize=8)
    ax.set_ylabel("requests/s (median, min-max)")
    ax.set_title("Throughput by scenario (bare: the same plain run in each group)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
