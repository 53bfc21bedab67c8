"""The benchmark's PNG: stall and commit per method, per state size."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _bars(ax: Any, groups: list[dict[str, Any]], names: list[str], colors: dict) -> None:
    """One bar group per entry of `groups` (name -> summary), min/max whiskers."""
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for i, group in enumerate(groups):
            summ = group.get(name)
            if summ:
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ys.append(summ["median"])
                lo.append(summ["median"] - summ["min"])
                hi.append(summ["max"] - summ["median"])
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name, color=colors[name])


def write_png(result: dict[str, Any], path: Path) -> None:
    """Stall (staged) and commit per method, one bar group per size, min/max whiskers;
    a third panel with the multi-rank commits when there are any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    sizes = result["sizes"]
    multi = [mr for mr in result.get("multirank", []) if "summary" in mr]
    names = list(dict.fromkeys(n for s in sizes for n in s["methods"]))
    mr_names = list(dict.fromkeys(n for mr in multi for n in mr["summary"]))
    cmap = plt.get_cmap("tab20")
    colors = {n: cmap(i % 20) for i, n in enumerate(dict.fromkeys(names + mr_names))}
    panels = []
    for key, title in (
        (
            ("staged_s", "stall (until state reusable)"),
            ("commit_s", "time to durable commit"),
        )
        if sizes
        else ()
    ):
        groups = [
            {n: m.get("summary", {}).get(key) for n, m in s["methods"].items()} for s in sizes
        ]
        panels.append((title, groups, [s["label"] for s in sizes], names))
    if multi:
        groups = [
            {n: m.get("summary", {}).get("all_committed_s") for n, m in mr["summary"].items()}
            for mr in multi
        ]
        ticks = [
            f"{mr['world']} ranks\n{'busy' if mr.get('busy', True) else 'idle'}" for mr in multi
        ]
        panels.append(("multi-rank: commit on all ranks", groups, ticks, mr_names))
    if not sizes and not multi:
        return
    width = max(8, 2 + 1.6 * max(1, len(sizes)) * len(names) / 3) * len(panels) / 2
    if not sizes:
        width = max(7, 1.2 * len(multi) * len(mr_names) / 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.8), squeeze=False)
    for ax, (title, groups, ticks, group_names) in zip(axes[0], panels, strict=True):
        _bars(ax, groups, group_names, colors)
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_ylabel("seconds (median of runs 2..N)")
        ax.set_title(title)
        ax.set_yscale("log")
        # Plain numbers read better than 6x10^0 on a log axis.
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    ncol = min(4, max(1, len(labels)))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(
        f"checkpoint benchmark, torch {result['machine']['torch']}, "
        f"{result['machine']['cpu_count']} CPUs"
    )
    rows = (len(labels) + ncol - 1) // ncol
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
