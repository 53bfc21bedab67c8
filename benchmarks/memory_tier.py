"""The memory tier against storage, side by side in one run (issue 20).

    python -m benchmarks.memory_tier --size 1GiB --repeats 5

Part 1, one process: a ``CheckpointManager(memory_every=1, save_every=1)``
(process executor) saves one state of ``--size`` bytes to both tiers each
round, in alternating order, then restores it twice into a fresh state:
through ``restore()`` (the memory tier, own copy) and with ``load()`` from the
storage step after its pages were dropped from the page cache (cold). Per
round: each tier's stall (``save`` returning) and call to commit, and both
restore times; every restore is checked bit-exact.

Part 2, two gloo ranks as two nodes of one rank each, ``--rank-size`` bytes
per rank, one training thread per rank (a 1-thread matmul step): blocks of
``--steps`` steps are timed, interleaved, with nothing saving ("alone"),
with a memory snapshot written locally but not replicated ("local", a
manager with ``ranks_per_node=2``) and with a snapshot replicated to the
other rank ("replicated"). Slowdown is the median step while the snapshot
is in flight against the median alone step of the same rounds.

Medians over rounds 2..N; ratios within one run. Writes
``benchmarks/results/memory-tier-<stamp>.json``.
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

import async_ckpt
from async_ckpt import CheckpointManager
from benchmarks.harness import log
from benchmarks.incremental import build_state
from benchmarks.limits import drop_page_cache
from benchmarks.metrics import fmt_bytes
from benchmarks.report import machine_info
from benchmarks.sizes import parse_size

TARGETS = {"restore_memory_vs_storage_cold": 0.2, "stall_memory_vs_storage": 1.0}


def _memory_parent() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _zeros_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _timed(save: Any, *args: Any) -> dict[str, float]:
    t0 = time.perf_counter()
    future = save(*args)
    stall = time.perf_counter() - t0
    future.result()
    return {"stall_s": stall, "commit_s": time.perf_counter() - t0}


def single_process(size: int, repeats: int, scratch: Path) -> list[dict[str, Any]]:
    state = build_state(size)
    root = scratch / "storage"
    memory = tempfile.mkdtemp(prefix="async-ckpt-bench-", dir=_memory_parent())
    rounds = []
    try:
        with CheckpointManager(
            root, save_every=1, memory_every=1, keep_last=2, memory_root=memory
        ) as manager:
            for step in range(1, repeats + 1):
                for t in state.values():
                    t.add_(1.0)
                record: dict[str, Any] = {"step": step}
                kinds = ("memory", "storage") if step % 2 else ("storage", "memory")
                for kind in kinds:
                    save = manager.save_to_memory if kind == "memory" else manager.save
                    record[kind] = _timed(save, step, state)
                manager.wait()
                target = _zeros_like(state)
                t0 = time.perf_counter()
                manager.restore(target)
                record["restore_memory_s"] = time.perf_counter() - t0
                assert manager.last_restore is not None
                record["restore_memory_source"] = manager.last_restore.source
                assert _equal(target, state), "memory restore is not bit-exact"
                target = _zeros_like(state)
                step_dir = Path(manager.checkpoint_id(step))
                drop_page_cache(step_dir)
                t0 = time.perf_counter()
                async_ckpt.load(target, checkpoint_id=step_dir)
                record["restore_storage_cold_s"] = time.perf_counter() - t0
                assert _equal(target, state), "storage restore is not bit-exact"
                del target
                rounds.append(record)
                log(f"round {step}: {json.dumps(record)}")
    finally:
        shutil.rmtree(memory, ignore_errors=True)
    return rounds


def _train_step(a: torch.Tensor, b: torch.Tensor) -> None:
    for _ in range(4):
        a.copy_(torch.tanh(a @ b))


def _rank_body(
    rank: int, world: int, scratch: str, rank_size: int, repeats: int, steps: int
) -> dict[str, Any]:
    import torch.distributed as dist

    torch.set_num_threads(1)
    state = build_state(rank_size)
    a, b = torch.randn(256, 256), torch.randn(256, 256) / 16
    managers = {
        kind: CheckpointManager(
            os.path.join(scratch, kind),
            memory_every=1,
            memory_root=os.path.join(scratch, f"{kind}-node{rank}"),
            ranks_per_node=per_node,
        )
        for kind, per_node in (("local", 2), ("replicated", 1))
    }
    times: dict[str, list[list[float]]] = {"alone": [], "local": [], "replicated": []}
    in_flight_s: dict[str, list[float]] = {"local": [], "replicated": []}
    stall_s: dict[str, list[float]] = {"local": [], "replicated": []}
    for round_no in range(repeats):
        for kind in ("alone", "local", "replicated"):
            dist.barrier()
            tier = managers[kind]._memory if kind != "alone" else None
            t0 = time.perf_counter()
            if tier is not None:
                managers[kind].save_to_memory(round_no + 1, state)
                stall_s[kind].append(time.perf_counter() - t0)
            block = []
            for _ in range(steps):
                s0 = time.perf_counter()
                _train_step(a, b)
                block.append(time.perf_counter() - s0)
                if tier is not None and tier.idle():
                    break
            if tier is not None:
                tier.wait()
                in_flight_s[kind].append(time.perf_counter() - t0)
            times[kind].append(block)
    replicated = managers["replicated"]._memory
    assert replicated is not None
    report = {
        "times": times,
        "in_flight_s": in_flight_s,
        "stall_s": stall_s,
        "replicas": replicated.store.inventory().replicas,
    }
    for manager in managers.values():
        manager.close()
    return report


def two_nodes(rank_size: int, repeats: int, steps: int, scratch: Path) -> list[dict[str, Any]]:
    from benchmarks.ranks import run_ranks

    memory = tempfile.mkdtemp(prefix="async-ckpt-bench-", dir=_memory_parent())
    try:
        return run_ranks(
            _rank_body, 2, memory, rank_size, repeats, steps, timeout=60 + 60 * repeats
        )
    finally:
        shutil.rmtree(memory, ignore_errors=True)


def summarize(single: list[dict], ranks: list[dict]) -> dict[str, Any]:
    later = single[1:] or single

    def med(values: list[float]) -> float:
        return statistics.median(values)

    summary: dict[str, Any] = {
        "memory_stall_s": med([r["memory"]["stall_s"] for r in later]),
        "storage_stall_s": med([r["storage"]["stall_s"] for r in later]),
        "memory_commit_s": med([r["memory"]["commit_s"] for r in later]),
        "storage_commit_s": med([r["storage"]["commit_s"] for r in later]),
        "restore_memory_s": med([r["restore_memory_s"] for r in later]),
        "restore_storage_cold_s": med([r["restore_storage_cold_s"] for r in later]),
    }
    summary["restore_memory_vs_storage_cold"] = (
        summary["restore_memory_s"] / summary["restore_storage_cold_s"]
    )
    summary["stall_memory_vs_storage"] = summary["memory_stall_s"] / summary["storage_stall_s"]
    per_rank = []
    for report in ranks:
        rounds = range(1, len(report["times"]["alone"])) or range(1)
        alone = med([t for r in rounds for t in report["times"]["alone"][r]])
        row = {"step_alone_ms": alone * 1e3}
        for kind in ("local", "replicated"):
            during = med([t for r in rounds for t in report["times"][kind][r]])
            row[f"step_{kind}_ms"] = during * 1e3
            row[f"slowdown_{kind}"] = during / alone - 1
            row[f"in_flight_{kind}_s"] = med([report["in_flight_s"][kind][r] for r in rounds])
            row[f"stall_{kind}_ms"] = med([report["stall_s"][kind][r] for r in rounds]) * 1e3
        per_rank.append(row)
    summary["ranks"] = per_rank
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| measure | memory tier | storage | ratio | target |",
        "|---|---|---|---|---|",
        f"| stall (save returns) | {summary['memory_stall_s'] * 1e3:.0f} ms | "
        f"{summary['storage_stall_s'] * 1e3:.0f} ms | {summary['stall_memory_vs_storage']:.2f}x "
        "| equal |",
        f"| call to commit | {summary['memory_commit_s']:.2f} s | "
        f"{summary['storage_commit_s']:.2f} s | "
        f"{summary['memory_commit_s'] / summary['storage_commit_s']:.2f}x | - |",
        f"| restore (storage cold) | {summary['restore_memory_s']:.2f} s | "
        f"{summary['restore_storage_cold_s']:.2f} s | "
        f"{summary['restore_memory_vs_storage_cold']:.3f}x | <= 0.2x |",
        "",
        "| rank | step alone | step, local snapshot | step, replicated | slowdown local "
        "| slowdown replicated | in flight (local / replicated) |",
        "|---|---|---|---|---|---|---|",
    ]
    for rank, row in enumerate(summary["ranks"]):
        lines.append(
            f"| {rank} | {row['step_alone_ms']:.1f} ms | {row['step_local_ms']:.1f} ms | "
            f"{row['step_replicated_ms']:.1f} ms | {row['slowdown_local']:+.1%} | "
            f"{row['slowdown_replicated']:+.1%} | {row['in_flight_local_s']:.2f} s / "
            f"{row['in_flight_replicated_s']:.2f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_tier", description=__doc__)
    p.add_argument("--size", default="1GiB", help="state of part 1")
    p.add_argument("--rank-size", default="256MiB", help="state per rank of part 2")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=400, help="most steps timed per block")
    p.add_argument("--dir", type=Path, default=Path(".bench-tmp"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="memory-tier-", dir=args.dir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load_start = os.getloadavg()
    try:
        single = single_process(parse_size(args.size), args.repeats, scratch)
        ranks = two_nodes(parse_size(args.rank_size), args.repeats, args.steps, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = summarize(single, ranks)
    result = {
        "started": stamp,
        "size": parse_size(args.size),
        "rank_size": parse_size(args.rank_size),
        "repeats": args.repeats,
        "machine": machine_info(args.dir),
        "loadavg": {"start": load_start, "end": os.getloadavg()},
        "single": single,
        "ranks": ranks,
        "summary": summary,
        "targets": TARGETS,
    }
    out = args.out / f"memory-tier-{stamp}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    print(
        f"memory tier vs storage, {fmt_bytes(parse_size(args.size))} (one process), "
        f"{fmt_bytes(parse_size(args.rank_size))} per rank (two nodes); load {load_start}"
    )
    print(table(summary))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
