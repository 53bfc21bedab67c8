"""Reporting: machine description, markdown tables, JSON and a PNG bar chart."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import psutil
import torch

GiB = 1 << 30


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if abs(v) >= 100 else f"{v:.3g} {unit}"
    return f"{int(n)} B"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def disk_info(directory: Path) -> dict[str, Any]:
    """Block device, rotational flag, filesystem and capacity behind a directory."""
    st = os.stat(directory)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    out: dict[str, Any] = {"dev": dev}
    sys_dev = Path("/sys/dev/block") / dev
    if sys_dev.exists():
        node = sys_dev.resolve()
        # A partition's queue/ lives on its parent disk.
        disk = node if (node / "queue").exists() else node.parent
        out["device"] = disk.name
        out["rotational"] = _read(disk / "queue" / "rotational")
        out["model"] = _read(disk / "device" / "model")
        out["scheduler"] = _read(disk / "queue" / "scheduler")
    real = os.path.realpath(directory)
    best = ""
    for line in Path("/proc/mounts").read_text().splitlines():
        src, mnt, fstype, opts = line.split()[:4]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best = mnt
            out.update(mount=mnt, source=src, fstype=fstype, options=opts)
    usage = shutil.disk_usage(directory)
    out["size"], out["free"] = usage.total, usage.free
    return out


def machine_info(directory: Path) -> dict[str, Any]:
    cpu_model = None
    for line in (_read(Path("/proc/cpuinfo")) or "").splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram": psutil.virtual_memory().total,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        # Other tenants' load skews every figure; record it so readers can tell.
        "loadavg_start": os.getloadavg(),
        "disk": disk_info(directory),
    }


def _loads(m: dict[str, Any], when: str) -> str:
    vals = m.get(f"loadavg_{when}")
    return "/".join(f"{x:.1f}" for x in vals) if vals else "?"


def machine_header(m: dict[str, Any]) -> str:
    d = m["disk"]
    rot = {"0": "non-rotational", "1": "rotational"}.get(str(d.get("rotational")), "?")
    disk = (
        f"{d.get('device', d['dev'])} ({rot}, {d.get('fstype', '?')} on {d.get('mount', '?')}, "
        f"{fmt_bytes(d['size'])}, {fmt_bytes(d['free'])} free)"
    )
    return "\n".join(
        [
            f"- CPU: {m['cpu_count']} x {m['cpu_model']} (torch threads {m['torch_threads']})",
            f"- RAM: {fmt_bytes(m['ram'])}",
            f"- torch {m['torch']}, Python {m['python']}, kernel {m['kernel']}",
            f"- bench disk: {disk}",
            f"- load average (1/5/15 min): {_loads(m, 'start')} at start, "
            f"{_loads(m, 'end')} at end, on {m['cpu_count']} CPUs",
        ]
    )


def _cell(s: dict[str, Any] | None, digits: int = 3) -> str:
    if s is None:
        return "—"
    if s["n"] > 1:
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"
    return f"{s['median']:.{digits}f}"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    """One table per size; times in seconds, median [min–max] of runs 2..N."""
    lines = [
        f"# Checkpoint benchmark {result['started']}",
        "",
        machine_header(result["machine"]),
        "",
    ]
    for size in result["sizes"]:
        lines += [
            f"## {size['label']} ({fmt_bytes(size['nbytes'])} in {size['n_tensors']} tensors, "
            f"{result['repeats']} runs, median of runs 2..N)",
            "",
            "| method | return s | staged s | commit s | commit GB/s | commit / write floor "
            "| staged / copy floor | load s | load / read floor | main RSS Δ | children RSS Δ "
            "| step slowdown |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in size["methods"].items():
            if m.get("error"):
                # The exception line is the last line of the traceback.
                why = m["error"].strip().splitlines()[-1][:100].replace("|", "/")
                lines.append(f"| {name} | failed: {why} |" + " |" * 10)
                continue
            s, r = m["summary"], m["ratios"]
            gbps = (size["nbytes"] / s["commit_s"]["median"] / 1e9) if s.get("commit_s") else None
            rss_d = s.get("rss_main_delta")
            rss_c = s.get("rss_children_delta")
            lines.append(
                " | ".join(
                    [
                        f"| {name}",
                        _cell(s.get("return_s")),
                        _cell(s.get("staged_s")),
                        _cell(s.get("commit_s")),
                        "—" if gbps is None else f"{gbps:.2f}",
                        _ratio(r.get("commit_vs_write")),
                        _ratio(r.get("staged_vs_copy")),
                        _cell(s.get("load_s")),
                        _ratio(r.get("load_vs_read")),
                        fmt_bytes(rss_d["median"]) if rss_d else "—",
                        fmt_bytes(rss_c["median"]) if rss_c and rss_c["median"] else "—",
                        _ratio(m.get("probe", {}).get("slowdown")),
                    ]
                )
                + " |"
            )
        lines.append("")
    lines += [
        "return = async call returned; staged = state may be mutated again (the training "
        "stall); commit = durable on disk (for memcpy_shm: copy done). Floors are the "
        "memcpy_shm / raw_write_fsync medians of the same run. Loads are cold (page cache "
        "dropped per file). RSS Δ = peak during the save minus RSS at its start (children: "
        "all descendant processes; shared pages count in each). Step slowdown = probe step "
        "time while the write is in flight / alone.",
        "",
    ]
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, default=str))


def write_png(result: dict[str, Any], path: Path) -> None:
    """Stall (staged) and commit per method, one bar group per size, min/max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    sizes = result["sizes"]
    names = list(dict.fromkeys(n for s in sizes for n in s["methods"]))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2 + 1.6 * len(sizes) * len(names) / 3), 4.5))
    width = 0.8 / max(1, len(names))
    for ax, key, title in (
        (axes[0], "staged_s", "stall (until state reusable)"),
        (axes[1], "commit_s", "time to durable commit"),
    ):
        for j, name in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for i, size in enumerate(sizes):
                summ = size["methods"].get(name, {}).get("summary", {}).get(key)
                if summ:
                    xs.append(i + (j - (len(names) - 1) / 2) * width)
                    ys.append(summ["median"])
                    lo.append(summ["median"] - summ["min"])
                    hi.append(summ["max"] - summ["median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name)
        ax.set_xticks(range(len(sizes)), [s["label"] for s in sizes])
        ax.set_ylabel("seconds (median of runs 2..N)")
        ax.set_title(title)
        ax.set_yscale("log")
        # Plain numbers read better than 6x10^0 on a log axis.
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = min(4, max(1, len(labels)))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(
        f"checkpoint benchmark, torch {result['machine']['torch']}, "
        f"{result['machine']['cpu_count']} CPUs"
    )
    rows = (len(labels) + ncol - 1) // ncol
    fig.tight_layout(rect=(0, 0.05 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
