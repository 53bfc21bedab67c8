"""Multi-rank saves: N gloo ranks on loopback, each holding 1/N of one state.

    python -m benchmarks.run --size 1GiB --ranks 2 --ranks 4 --methods none

This module starts the ranks (``benchmarks.ranks``) and runs the saves;
what each rank saves and the methods compared (``raw_parallel_write``, the
floor; ``async_ckpt_async``; ``dcp_async``; ``dcp_async_cached``) live in
``multirank_methods``, the statistics in ``multirank_summary``. The methods
run interleaved, each save started by all ranks together after a barrier.

Per save: stall (until save() returned), staged, commit (this rank's
future done) and the slowest rank's figures. "busy" runs mutate the state
again as soon as it is staged (CPU-bound training racing the write, as in
the single-process harness); "idle" runs wait (training on an accelerator).
"control overhead" is the time spent planning before the first byte is
written: for async_ckpt ``SaveFuture.stats.plan_s`` (the fixed-size digest
all-gather and plan-cache check); for DCP the time from ``set_up_planner``
to the end of ``finish_plan`` in the background thread (local plan, plan
gather, global plan, scatter), measured with a planner subclass. Both
exclude staging.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.base import remove_path
from benchmarks.metrics import now
from benchmarks.multirank_methods import (
    METHODS,
    build_sharded_state,
    local_tensors,
    make_method,
    mutate_local,
)
from benchmarks.multirank_summary import one_line, summarize
from benchmarks.ranks import run_ranks

__all__ = ["METHODS", "one_line", "run", "summarize"]


# ---------------------------------------------------------------- one rank
def _rank_main(
    rank: int, world: int, total: int, repeats: int, root: str, seed: int, busy: bool
) -> dict[str, Any] | None:
    """Every method's saves on this rank; rank 0 returns the gathered figures."""
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", message=".*overwriting.*")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    state = build_sharded_state(total, mesh, seed)
    local_bytes = sum(t.nbytes for t in local_tensors(state))
    methods = [make_method(n) for n in METHODS]
    result: dict[str, Any] = {"world": world, "methods": {m.name: {"saves": []} for m in methods}}
    for m in methods:
        m.setup()
    base = Path(root)
    for r in range(repeats):
        for m in methods:
            path = base / f"{m.name}.r{r}"
            mutate_local(state)
            dist.barrier()
            err = ""
            t0 = now()
            try:
                pending = m.save(state, path)
                t1 = now()
                pending.wait_staged()
                t2 = now()
                if busy:
                    mutate_local(state)  # CPU-bound training goes on during the write
                pending.wait_committed()
                t3 = now()
                rec = {"return_s": t1 - t0, "staged_s": t2 - t0, "commit_s": t3 - t0}
                rec.update(m.run_info())
            except Exception:
                err = traceback.format_exc()
                rec = {}
            dist.barrier()
            rec["all_committed_s"] = now() - t0
            per_rank = [None] * world
            dist.all_gather_object(per_rank, (rec, err))
            if rank == 0:
                errors = [e for _, e in per_rank if e]
                entry: dict[str, Any] = {"per_rank": [x for x, _ in per_rank]}
                if errors:
                    entry["error"] = errors[0]
                result["methods"][m.name]["saves"].append(entry)
                remove_path(path)
            dist.barrier()
    for m in methods:
        m.teardown()
    all_bytes = [0] * world
    dist.all_gather_object(all_bytes, local_bytes)
    if rank != 0:
        return None
    result["bytes_per_rank"] = all_bytes
    result["nbytes"] = sum(all_bytes)
    return result


def run(
    total: int, world: int, repeats: int, scratch: Path, seed: int = 0, busy: bool = True
) -> dict[str, Any]:
    """Start `world` ranks, run every method `repeats` times, summarise.

    busy: each rank mutates its state again as soon as it is staged (CPU-bound
    training racing the write); otherwise the ranks wait idle (training on an
    accelerator), which shows the control traffic without CPU contention.
    """
    root = scratch / f"ranks{world}-{'busy' if busy else 'idle'}"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        # The ranks report together at the end: the timeout bounds the whole run.
        raw = run_ranks(_rank_main, world, total, repeats, str(root), seed, busy, timeout=3600)[0]
    finally:
        remove_path(root)
    raw["wall_s"] = time.perf_counter() - t0
    raw["repeats"] = repeats
    raw["busy"] = busy
    raw["summary"] = summarize(raw)
    return raw


if __name__ == "__main__":  # python -m benchmarks.multirank WORLD [SIZE_BYTES]
    w = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 64 << 20
    res = run(size, w, 3, Path(".bench-tmp"))
    print(json.dumps(res["summary"], indent=2))
    print(one_line(res))
