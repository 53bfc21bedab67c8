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

from benchmarks.metrics import fmt_bytes
from benchmarks.targets import targets_section

GiB = 1 << 30


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


def _revision() -> str | None:
    """The repository's commit, with '+dirty' when async_ckpt/ has local changes."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "async_ckpt"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty" if dirty else "")) or None


def machine_info(directory: Path) -> dict[str, Any]:
    cpu_model = None
    for line in (_read(Path("/proc/cpuinfo")) or "").splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return {
        "cpu_count": os.cpu_count(),
        "async_ckpt_revision": _revision(),
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
            f"- torch {m['torch']}, Python {m['python']}, kernel {m['kernel']}, async_ckpt "
            f"{m.get('async_ckpt_revision') or '?'}",
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
            "| method | return s | staged s | commit s | commit GB/s | commit / 1-stream floor "
            "| commit / best floor | staged / copy floor | load s | load / 1-stream read "
            "| load / best read | main RSS Δ | children RSS Δ | step slowdown |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in size["methods"].items():
            if m.get("error"):
                # The exception line is the last line of the traceback.
                why = m["error"].strip().splitlines()[-1][:100].replace("|", "/")
                lines.append(f"| {name} | failed: {why} |" + " |" * 12)
                continue
            if m.get("skipped"):
                lines.append(f"| {name} | {m['skipped']} |" + " |" * 12)
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
                        _ratio(r.get("commit_vs_best_write")),
                        _ratio(r.get("staged_vs_copy")),
                        _cell(s.get("load_s")),
                        _ratio(r.get("load_vs_read")),
                        _ratio(r.get("load_vs_best_read")),
                        fmt_bytes(rss_d["median"]) if rss_d else "—",
                        fmt_bytes(rss_c["median"]) if rss_c and rss_c["median"] else "—",
                        _ratio(m.get("probe", {}).get("slowdown")),
                    ]
                )
                + " |"
            )
        lines.append("")
        lines += floors_section(size)
        lines += ours_details(size)
        if size.get("isolated"):
            lines += isolated_section(size["isolated"])
    for mr in result.get("multirank", []):
        lines += multirank_section(mr)
    lines += targets_section(result)
    lines += [
        "return = async call returned; staged = state may be mutated again (the training "
        "stall); commit = durable on disk (for memcpy_shm: copy done). Floors are medians "
        "of the same run: copy = memcpy_shm; 1-stream = raw_write_fsync (its commit, its cold "
        "read); best = the fastest floor variant (see Floors). Loads are cold (page cache "
        "dropped per file). RSS Δ = peak during the save minus RSS at its start (children: "
        "all descendant processes; shared pages count in each). Step slowdown = probe step "
        "time while the write is in flight / alone.",
        "",
    ]
    return "\n".join(lines)


def _best_line(best: dict[str, Any] | None, what: str) -> str:
    if not best:
        return f"no {what}: no floor variant ran"
    return f"{what}: `{best['method']}` ({best['seconds']:.3f} s, {best['gb_per_s']:.2f} GB/s)"


def floors_section(size: dict[str, Any]) -> list[str]:
    """Every write/read floor variant of the size, and which one is the best floor."""
    floors = size.get("floors")
    if not floors:
        return []
    best_w = (floors.get("write") or {}).get("method")
    best_r = (floors.get("read") or {}).get("method")
    rows = []
    for name, m in size["methods"].items():
        if name not in floors.get("variants", []):
            continue
        info, s = m.get("info", {}), m.get("summary", {})
        io = "O_DIRECT" if info.get("direct") else "buffered"
        if m.get("error") or m.get("skipped"):
            why = (m.get("skipped") or m["error"].strip().splitlines()[-1])[:100]
            rows.append(f"| {name} | {info.get('streams', '?')} | {io} | {why} | | | |")
            continue
        cells = []
        for key, best in (("commit_s", best_w), ("load_s", best_r)):
            summ = s.get(key)
            gbps = f"{size['nbytes'] / summ['median'] / 1e9:.2f}" if summ else "—"
            mark = "**" if name == best else ""
            cells += [f"{mark}{_cell(summ)}{mark}", gbps]
        rows.append(f"| {name} | {info.get('streams', '?')} | {io} | " + " | ".join(cells) + " |")
    skipped = floors.get("skipped") or {}
    return [
        f"### Floors ({size['label']})",
        "",
        "| floor | streams | I/O | write + fsync s | write GB/s | cold read s | read GB/s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"{_best_line(floors.get('write'), 'Best write floor')}. "
        f"{_best_line(floors.get('read'), 'Best read floor')}. "
        "Each is the lowest median of the variants above in this run; `commit / best floor` "
        "and `load / best read` divide by them, the 1-stream ratios by `raw_write_fsync`."
        + (f" Skipped: {', '.join(skipped)} ({next(iter(skipped.values()))})." if skipped else ""),
        "",
    ]


def _med(s: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    return "—" if not s else f"{s['median'] * scale:.{digits}f}"


def ours_details(size: dict[str, Any]) -> list[str]:
    """async_ckpt methods: the library's own figures and memory per save."""
    rows = []
    for name, m in size["methods"].items():
        if not name.startswith("async_ckpt") or m.get("error") or m.get("skipped"):
            continue
        s, info = m["summary"], m.get("info", {})
        uss = s.get("worker_uss_peak")
        first = s.get("staged_s") or {}
        commit = s.get("commit_s") or {}
        copied = s.get("copied_bytes")
        ratio = m["ratios"].get("staged_vs_all_changed")
        rows.append(
            " | ".join(
                [
                    f"| {name}",
                    _med(s.get("return_s"), 1e3, 1),
                    _med(s.get("plan_s"), 1e3, 2),
                    fmt_bytes(copied["median"]) if copied else "—",
                    "—" if ratio is None else f"{ratio:.2f}x",
                    fmt_bytes(uss["median"]) if uss else "—",
                    fmt_bytes(s["rss_main_peak"]["median"]) if s.get("rss_main_peak") else "—",
                    "—" if "start_s" not in info else f"{info['start_s']:.2f}",
                    f"{first['first']:.3f} / {commit['first']:.3f}" if first and commit else "—",
                ]
            )
            + " |"
        )
    if not rows:
        return []
    return [
        f"### async_ckpt details ({size['label']})",
        "",
        "| method | stall ms | plan ms | copied per save | staged / all-changed "
        "| worker USS peak | harness RSS peak | start() s | first save staged / commit s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "stall = until save() returned; plan = SaveFuture.stats.plan_s; worker USS = pages "
        "private to the worker process (the shared arena excluded); harness RSS peak is the "
        "whole benchmark process, which also holds every other method's buffers (see the "
        "isolated profile for async_ckpt alone). First save = run 1, after start() in setup.",
        "",
    ]


def isolated_section(r: dict[str, Any]) -> list[str]:
    if "error" in r:
        why = r["error"].strip().splitlines()[-1][:200]
        return ["### async_ckpt alone (fresh process)", "", f"failed: {why}", ""]
    first, cold = r["started"][0], r["not_started"][0]
    n = r["nbytes"]
    uss = r.get("worker_uss_peak")
    return [
        "### async_ckpt alone (fresh process)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| start() (spawn worker, import, handshake) | {r['start_s']:.2f} s |",
        f"| first save after start(): stall / staged / commit | {first['return_s']:.3f} / "
        f"{first['staged_s']:.3f} / {first['commit_s']:.3f} s |",
        *(
            [
                f"| start(state) (worker + staging arenas) | {r['start_with_state_s']:.2f} s |",
                f"| first save after start(state): stall / staged / commit | "
                f"{r['started_with_state'][0]['return_s']:.3f} / "
                f"{r['started_with_state'][0]['staged_s']:.3f} / "
                f"{r['started_with_state'][0]['commit_s']:.3f} s |",
            ]
            if r.get("started_with_state")
            else []
        ),
        f"| first save without start(): stall / staged / commit | {cold['return_s']:.3f} / "
        f"{cold['staged_s']:.3f} / {cold['commit_s']:.3f} s |",
        f"| later saves (median): staged / commit | {r['steady_staged_s']:.3f} / "
        f"{r['steady_commit_s']:.3f} s |",
        f"| sync save: time / peak RSS over the pre-state baseline | {r['sync_save_s']:.3f} s / "
        f"{fmt_bytes(r['sync_peak_over_base'])} ({r['sync_peak_over_base'] / n:.2f}x state) |",
        f"| async saves: peak RSS over the pre-state baseline | "
        f"{fmt_bytes(r['async_peak_over_base'])} = {r['main_peak_vs_state_plus_arena']:.2f}x "
        f"(state + one arena = {fmt_bytes(2 * n)}) |",
        f"| worker USS: idle / peak during saves | {fmt_bytes(r['worker_uss_idle'])} / "
        + ("—" if not uss else f"{fmt_bytes(uss)} ({uss / n:.3f}x state)")
        + " |",
        "",
    ]


def _mode(mr: dict[str, Any]) -> str:
    if mr.get("busy", True):
        return "busy (ranks mutate their state during the write)"
    return "idle (ranks wait during the write)"


def multirank_section(mr: dict[str, Any]) -> list[str]:
    world = mr.get("world")
    if "error" in mr:
        why = mr["error"].strip().splitlines()[-1][:200]
        return [f"## {world} ranks, {_mode(mr)}", "", f"failed: {why}", ""]
    lines = [
        f"## {world} ranks, {_mode(mr)} ({fmt_bytes(mr['nbytes'])} in total as DTensor "
        f"Shard(0), gloo on loopback, {mr['repeats']} runs, median of runs 2..N, slowest rank)",
        "",
        "| method | stall s | staged s | commit s (all ranks) | commit / parallel write "
        "| control ms (slowest rank) | control ms (last rank to arrive) | ours / this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in mr["summary"].items():
        s = m.get("summary", {})
        if m.get("n_failed") and not s:
            why = m["errors"][0].strip().splitlines()[-1][:100].replace("|", "/")
            lines.append(f"| {name} | failed: {why} |" + " |" * 6)
            continue
        ours = m.get("ours_plan_min_rank_s_vs_this")
        lines.append(
            " | ".join(
                [
                    f"| {name}",
                    _cell(s.get("return_s")),
                    _cell(s.get("staged_s")),
                    _cell(s.get("all_committed_s")),
                    _ratio(m.get("commit_vs_parallel_write")),
                    _med(s.get("plan_s"), 1e3, 1),
                    _med(s.get("plan_min_rank_s"), 1e3, 1),
                    _ratio(ours),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "control = planning before the first byte is written, staging excluded: "
        "async_ckpt's SaveFuture.stats.plan_s; DCP's set_up_planner .. finish_plan in its "
        "background thread. The slowest rank's figure includes waiting for the other ranks to "
        "finish staging; the last rank to arrive sees the exchange alone.",
        "",
    ]
    return lines


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, default=str))
