"""Incremental saves against full saves, side by side in one run (issue 19).

    python -m benchmarks.incremental --size 1GiB --repeats 5

One state of ``--size`` bytes in 16 MiB float32 tensors, one process-executor
``AsyncCheckpointer``, three saves per round, interleaved (full, 90 %
unchanged, all changed), each round into fresh directories:

- ``full``: a plain save, every byte written (the reference);
- ``frozen90``: ``base=`` the previous incremental checkpoint, after a
  training step that changed the first 10 % of the tensors;
- ``changed``: ``base=`` likewise, after a step that changed every tensor:
  every chunk is hashed and written, the price of hashing;
- ``frozen90_skip``: ``frozen90`` on a second checkpointer whose stager has
  ``skip_unchanged=True`` (opt-in: tensors whose version counter did not
  move are not copied again), so only the changed tenth is staged.

Per save: call to commit (``future.result()``) and the bytes the save wrote
(its own data files). Then a ``CheckpointManager(incremental=True,
keep_last=5)`` saves the 90 %-unchanged state eight times, and the disk
space of the five kept steps (distinct inodes) is set against one full
checkpoint. Medians over rounds 2..N; ratios against ``full`` of the same
rounds. Writes ``benchmarks/results/incremental-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from async_ckpt import AsyncCheckpointer, CheckpointManager, Stager
from benchmarks.harness import log
from benchmarks.metrics import fmt_bytes
from benchmarks.report import machine_info
from benchmarks.sizes import parse_size

TENSOR_BYTES = 16 * 1024 * 1024
FROZEN = 0.9
TARGETS = {
    "frozen90_commit": 0.15,  # x the full save's commit
    "frozen90_skip_commit": 0.15,
    "frozen90_new_bytes": 0.12,  # x the state
    "changed_commit": 1.05,  # x the full save's commit
    "keep5_disk": 1.5,  # x one full checkpoint
}


def build_state(size: int) -> dict[str, torch.Tensor]:
    count = max(10, size // TENSOR_BYTES)
    numel = size // count // 4
    return {f"layer{i:03d}.weight": torch.randn(numel) for i in range(count)}


def train_step(state: dict[str, torch.Tensor], fraction: float) -> None:
    """Change the first ``fraction`` of the tensors (every byte of each)."""
    keys = sorted(state)
    for key in keys[: max(1, round(len(keys) * fraction))]:
        state[key].add_(1.0)


def timed_save(ckpt: AsyncCheckpointer, state: dict, path: Path, **kwargs: Any) -> dict:
    t0 = time.perf_counter()
    meta = ckpt.save(state, checkpoint_id=str(path), **kwargs).result()
    return {"commit_s": time.perf_counter() - t0, "new_bytes": meta.new_bytes}


def rounds(state: dict, scratch: Path, repeats: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {"full": [], "frozen90": [], "changed": [], "frozen90_skip": []}
    skipping = AsyncCheckpointer(stager=Stager(skip_unchanged=True))
    with AsyncCheckpointer() as ckpt, skipping:
        base = scratch / "base"
        ckpt.save(state, checkpoint_id=str(base), incremental=True).result()
        skipping.save(state, checkpoint_id=str(scratch / "skip-base"), incremental=True).result()
        for r in range(repeats):
            round_dir = scratch / f"round{r}"
            train_step(state, 1.0)
            runs["full"].append(timed_save(ckpt, state, round_dir / "full"))
            # the base of the next two: the state as it is now, digested
            ckpt.save(state, checkpoint_id=str(round_dir / "base"), incremental=True).result()
            train_step(state, 1 - FROZEN)
            runs["frozen90"].append(
                timed_save(ckpt, state, round_dir / "frozen90", base=str(round_dir / "base"))
            )
            train_step(state, 1.0)
            runs["changed"].append(
                timed_save(ckpt, state, round_dir / "changed", base=str(round_dir / "frozen90"))
            )
            # its base: the same state, saved through the skipping stager (which then
            # holds it staged), then a step that changes a tenth
            skip_base = str(round_dir / "skip-base")
            skipping.save(state, checkpoint_id=skip_base, incremental=True).result()
            train_step(state, 1 - FROZEN)
            runs["frozen90_skip"].append(
                timed_save(skipping, state, round_dir / "frozen90_skip", base=skip_base)
            )
            log(
                f"round {r + 1}: "
                + ", ".join(f"{k} {v[-1]['commit_s']:.3f}s" for k, v in runs.items())
            )
            shutil.rmtree(round_dir)
    return runs


def disk_of_kept(state: dict, scratch: Path, saves: int = 8) -> dict[str, Any]:
    root = scratch / "managed"
    with CheckpointManager(root, keep_last=5, incremental=True) as manager:
        for step in range(1, saves + 1):
            train_step(state, 1 - FROZEN)
            manager.save(step, state).result()
        kept = manager.steps()
    inodes: dict[int, int] = {}
    for path in root.rglob("*.data"):
        st = path.stat()
        inodes[st.st_ino] = st.st_size
    full = sum(t.numel() * t.element_size() for t in state.values())
    return {"kept": kept, "disk_bytes": sum(inodes.values()), "full_bytes": full}


def summarize(runs: dict[str, list[dict]], disk: dict, size: int) -> dict[str, Any]:
    steady = {k: v[1:] or v for k, v in runs.items()}

    def med(method: str, key: str) -> float:
        return statistics.median(r[key] for r in steady[method])

    full = med("full", "commit_s")
    ratios = {
        "frozen90_commit": med("frozen90", "commit_s") / full,
        "frozen90_skip_commit": med("frozen90_skip", "commit_s") / full,
        "frozen90_new_bytes": med("frozen90", "new_bytes") / size,
        "changed_commit": med("changed", "commit_s") / full,
        "keep5_disk": disk["disk_bytes"] / disk["full_bytes"],
    }
    return {
        "median_commit_s": {m: med(m, "commit_s") for m in runs},
        "median_new_bytes": {m: med(m, "new_bytes") for m in runs},
        "ratios": ratios,
        "met": {k: ratios[k] <= TARGETS[k] for k in TARGETS if k in ratios},
    }


def table(summary: dict[str, Any], size: int) -> str:
    s, r = summary, summary["ratios"]
    lines = [
        "| save | call to commit (median) | x full | bytes written | x state |",
        "|---|---|---|---|---|",
    ]
    for m in ("full", "frozen90", "frozen90_skip", "changed"):
        commit = s["median_commit_s"][m]
        written = s["median_new_bytes"][m]
        lines.append(
            f"| {m} | {commit:.3f} s | {commit / s['median_commit_s']['full']:.2f} | "
            f"{fmt_bytes(written)} | {written / size:.3f} |"
        )
    lines.append("")
    lines.append(f"keep_last=5 incremental, 90 % unchanged: disk {r['keep5_disk']:.2f}x one full")
    lines.append(
        "targets: "
        + ", ".join(
            f"{k} {r[k]:.3f} <= {TARGETS[k]} {'met' if summary['met'][k] else 'MISSED'}"
            for k in TARGETS
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.incremental", description=__doc__)
    p.add_argument("--size", default="1GiB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", type=Path, default=Path(".bench-tmp"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    size = parse_size(args.size)
    args.dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="incremental-", dir=args.dir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load_start = os.getloadavg()
    try:
        state = build_state(size)
        size = sum(t.numel() * t.element_size() for t in state.values())
        runs = rounds(state, scratch, args.repeats)
        disk = disk_of_kept(state, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = summarize(runs, disk, size)
    result = {
        "started": stamp,
        "size": size,
        "tensors": len(state),
        "repeats": args.repeats,
        "machine": machine_info(args.dir),
        "loadavg": {"start": load_start, "end": os.getloadavg()},
        "runs": runs,
        "disk": disk,
        "summary": summary,
    }
    out = args.out / f"incremental-{stamp}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"incremental saves, {fmt_bytes(size)} in {len(state)} tensors, load {load_start}")
    print(table(summary, size))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
