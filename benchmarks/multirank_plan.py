"""Multi-rank control overhead alone: ``Planner.plan`` on a cached plan, N gloo ranks.

    python -m benchmarks.multirank_plan --ranks 4 --items 300 --calls 50

No staging, no writes, no worker processes: each rank describes ``--items``
row-sharded tensors, plans once (the full exchange), then times ``--calls``
cached plans, each started by all ranks together after a barrier. A cached
plan is the per-save cost of a steady training loop: fingerprinting the state
and one fixed-size digest collective. Prints each rank's median and minimum.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.ranks import run_ranks


def _rank(rank: int, world: int, items: int, calls: int) -> tuple[int, float, float, float]:
    from async_ckpt.dist.comm import GroupComm
    from async_ckpt.planning.plan import Planner
    from async_ckpt.state.model import LocalState, TensorItem

    torch.set_num_threads(1)
    state = LocalState(
        items=[
            TensorItem(
                key=f"model.layer{i}.weight",
                path=("model", f"layer{i}", "weight"),
                dtype="float32",
                shape=(64 * world, 128),
                offsets=(64 * rank, 0),
                sizes=(64, 128),
            )
            for i in range(items)
        ]
    )
    comm, planner = GroupComm(None), Planner()
    planner.plan(state, comm)
    before = comm.collective_count
    times = []
    for _ in range(calls):
        dist.barrier()
        t0 = time.perf_counter()
        planner.plan(state, comm)
        times.append(time.perf_counter() - t0)
    per_plan = (comm.collective_count - before) / calls
    assert planner.full_plans == 1, "the cached plan was not reused"
    return rank, statistics.median(times), min(times), per_plan


def run(world: int, items: int = 300, calls: int = 50) -> list[tuple[int, float, float, float]]:
    """Per rank: (rank, median s, min s, collectives per cached plan)."""
    return run_ranks(_rank, world, items, calls, timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    results = run(args.ranks, args.items, args.calls)
    for rank, med, low, per_plan in results:
        print(
            f"rank {rank}: median {med * 1e3:.2f} ms, min {low * 1e3:.2f} ms, "
            f"{per_plan:g} collective(s) per cached plan"
        )
    medians = [med for _, med, _, _ in results]
    print(
        f"{args.ranks} ranks, {args.items} items: cached plan median "
        f"{min(medians) * 1e3:.2f}..{max(medians) * 1e3:.2f} ms across ranks"
    )


if __name__ == "__main__":
    main()
