"""Our commits against the best write floors, in a fair order.

    python -m benchmarks.floor_ab [--size 1GiB --rounds 12]

Why another comparison beside ``benchmarks.run``: on this machine's virtual
disk a write that follows the removal of an earlier checkpoint (its blocks
freed) measured faster than one that does not, by up to 30 %. An A/B loop
that removes its outputs only at the end of a round therefore favours
whichever variant comes second. Here every measurement follows the removal
of the one before it, and the order rotates each round so that each variant
takes each slot equally often.

Variants, all writing the same ~``--size`` state of 304 tensors:

* ``raw4``, ``raw8``: the buffered N-stream floors of ``benchmarks.floors``
  (``StreamWriteFloor``: N files written from N threads straight from tensor
  memory, each fsynced, then the directory), the same code as in
  ``benchmarks.run``;
* ``sync``: ``async_ckpt.save``;
* ``async``: ``AsyncCheckpointer(executor="process")``, call to commit
  (staging included).

Prints and records the medians, the ratio of each median to the best floor
median, and the median of the per-round ratios to that round's best floor;
load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import async_ckpt
from async_ckpt import AsyncCheckpointer
from benchmarks.base import BenchContext
from benchmarks.floors import StreamWriteFloor
from benchmarks.sizes import parse_size

TENSORS = 304


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.floor_ab", description=__doc__)
    p.add_argument("--size", default="1GiB")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--dir", type=Path, default=Path(".bench-tmp"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    nbytes = parse_size(args.size)
    args.dir.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    torch.manual_seed(0)
    per_tensor = max(1, nbytes // TENSORS // 4)
    state = {f"layer{i}.w": torch.randn(per_tensor) for i in range(TENSORS)}
    tensors = list(state.values())
    load_start = os.getloadavg()
    ctx = BenchContext(root, state, sum(t.nbytes for t in tensors))
    floors = {streams: StreamWriteFloor(streams) for streams in (4, 8)}
    for floor in floors.values():
        floor.setup(ctx)
    ckpt = AsyncCheckpointer(executor="process", no_dist=True)
    try:
        ckpt.save(state, checkpoint_id=root / "warm").result()  # worker and arena made
        shutil.rmtree(root / "warm")
        variants: dict[str, Callable[[Path], object]] = {
            "raw4": lambda path: floors[4].save(state, path),
            "raw8": lambda path: floors[8].save(state, path),
            "sync": lambda path: async_ckpt.save(state, checkpoint_id=path, no_dist=True),
            "async": lambda path: ckpt.save(state, checkpoint_id=path).result(),
        }
        names = list(variants)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                path = root / f"{name}-{r}"
                t0 = time.perf_counter()
                variants[name](path)
                times[name].append(time.perf_counter() - t0)
                shutil.rmtree(path)
            print(f"round {r}: " + " ".join(f"{n} {times[n][-1]:.3f}" for n in names), flush=True)
    finally:
        ckpt.close()
        for floor in floors.values():
            floor.teardown()
        shutil.rmtree(root, ignore_errors=True)
    medians = {n: statistics.median(v) for n, v in times.items()}
    best = min(medians["raw4"], medians["raw8"])
    floors = [min(a, b) for a, b in zip(times["raw4"], times["raw8"], strict=True)]
    per_round = {
        n: statistics.median([t / f for t, f in zip(v, floors, strict=True)])
        for n, v in times.items()
    }
    record = {
        "size": args.size,
        "nbytes": ctx.nbytes,
        "rounds": args.rounds,
        "async_ckpt": async_ckpt.__file__,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "times_s": times,
        "median_s": medians,
        "median_over_best_floor_median": {n: m / best for n, m in medians.items()},
        "median_of_round_ratios": per_round,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"floor-ab-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=1))
    for n in names:
        print(
            f"{n:6s} median {medians[n]:.3f} s  {medians[n] / best:.3f}x the best floor median  "
            f"{per_round[n]:.3f}x by rounds"
        )
    print(f"load average {load_start} -> {record['load_average_end']}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
