"""Many small tensors: the caller's per-tensor cost, against the raw copy of the same tensors.

    python -m benchmarks.many_tensors [--tensors 100000 --numel 16 --saves 5 --rounds 2]
    python -m benchmarks.many_tensors --compare-with /path/to/other/checkout
    python -m benchmarks.many_tensors --vs-dcp [--tensors 100000 --rounds 2]

Each variant runs in its own process (so one's worker and arenas do not
disturb the other), rounds interleaved (A B A B ...). Per variant: the time
``AsyncCheckpointer.save`` blocks (control back) with synchronous and with
asynchronous staging, on saves after the first (an unchanged structure:
cached), and the time from the call to the committed checkpoint. Floors, in
the same process: a Python loop of ``copy_`` of the same tensors into
preallocated memory, and one ``torch._foreach_copy_`` call. Medians; load
average at start and end. ``--compare-with`` adds the same runs of another
checkout (its ``async_ckpt`` imported through PYTHONPATH), e.g. the code
before a change.

``--vs-dcp`` measures instead what a fresh process pays: the first save
(nothing cached) and the load of what it wrote, by ours (``save``, and an
``AsyncCheckpointer`` with the process executor, call to commit) and by DCP
(``save``, and ``async_save`` to its commit), each method in its own process,
rounds interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import gc, json, statistics, sys, tempfile, time, torch
import async_ckpt
from async_ckpt import AsyncCheckpointer, Stager
n, numel, saves, root = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
state = {f"layer{i}.w": torch.randn(numel) for i in range(n)}
out = {"async_ckpt": async_ckpt.__file__}
for mode in ("sync", "async"):
    back, commit = [], []
    with AsyncCheckpointer(executor="process", no_dist=True,
                           stager=Stager(async_staging=mode == "async")) as ckpt:
        for i in range(saves):
            t0 = time.perf_counter()
            fut = ckpt.save(state, checkpoint_id=f"{root}/{mode}{i % 2}")
            back.append(time.perf_counter() - t0)
            fut.result()
            commit.append(time.perf_counter() - t0)
    out[mode] = {"back_s": back[1:], "commit_s": commit[1:]}
dst = [torch.empty(numel) for _ in range(n)]
src = list(state.values())
loop, batched = [], []
for _ in range(3):
    t0 = time.perf_counter()
    for d, s in zip(dst, src):
        d.copy_(s)
    loop.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    torch._foreach_copy_(dst, src)
    batched.append(time.perf_counter() - t0)
out["copy_loop_s"], out["foreach_copy_s"] = loop, batched
print(json.dumps(out))
"""


# The first save of a fresh process (nothing cached) and the load of what it wrote,
# by one method: ours (sync, or async with the process executor) or DCP's.
_FIRST_CHILD = r"""
import json, sys, time, warnings, torch
warnings.simplefilter("ignore")
method, n, numel, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
state = {f"layer{i}.w": torch.randn(numel) for i in range(n)}
target = {k: torch.zeros(numel) for k in state}
ckpt = f"{root}/{method}"
if method.startswith("dcp"):
    import torch.distributed.checkpoint as dcp
    t0 = time.perf_counter()
    if method == "dcp_async":
        dcp.async_save(state, checkpoint_id=ckpt).result()
    else:
        dcp.save(state, checkpoint_id=ckpt)
    t1 = time.perf_counter()
    dcp.load(target, checkpoint_id=ckpt)
else:
    import async_ckpt
    if method == "async_ckpt_async":
        with async_ckpt.AsyncCheckpointer(executor="process", no_dist=True) as c:
            c.save({"warm": torch.zeros(1)}, checkpoint_id=f"{root}/warm").result()
            t0 = time.perf_counter()
            c.save(state, checkpoint_id=ckpt).result()
            t1 = time.perf_counter()
    else:
        t0 = time.perf_counter()
        async_ckpt.save(state, checkpoint_id=ckpt, no_dist=True)
        t1 = time.perf_counter()
    async_ckpt.load(target, checkpoint_id=ckpt, no_dist=True)
t2 = time.perf_counter()
assert all(torch.equal(target[k], v) for k, v in state.items())
print(json.dumps({"save_s": t1 - t0, "load_s": t2 - t1}))
"""
FIRST_METHODS = ("async_ckpt_sync", "async_ckpt_async", "dcp_save", "dcp_async")


def _run_first(method: str, args: argparse.Namespace, root: Path) -> dict:
    cmd = [sys.executable, "-c", _FIRST_CHILD, method, str(args.tensors), str(args.numel)]
    with tempfile.TemporaryDirectory(dir=root.resolve()) as d:
        done = subprocess.run([*cmd, d], cwd=d, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def vs_dcp(args: argparse.Namespace) -> int:
    """First save, and save + load, of the same state by each method, rounds interleaved."""
    load_start = os.getloadavg()
    runs: dict[str, list[dict]] = {m: [] for m in FIRST_METHODS}
    for r in range(args.rounds):
        for method in FIRST_METHODS:
            runs[method].append(_run_first(method, args, args.dir))
            print(f"[round {r + 1}/{args.rounds}] {method} done", file=sys.stderr, flush=True)
    load_end = os.getloadavg()
    summary = {}
    for m, rs in runs.items():
        save = statistics.median(x["save_s"] for x in rs)
        total = statistics.median(x["save_s"] + x["load_s"] for x in rs)
        summary[m] = {"save_s": save, "save_load_s": total}
    print(f"# first save and save + load, {args.tensors} tensors of {args.numel} float32")
    print(f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end; medians, s\n")
    print("| method | first save | save + load | save / DCP's | save + load / DCP's |")
    print("|---|---|---|---|---|")
    for m, row in summary.items():
        peer = summary["dcp_async" if m == "async_ckpt_async" else "dcp_save"]
        print(
            f"| {m} | {row['save_s']:.2f} | {row['save_load_s']:.2f} | "
            f"{row['save_s'] / peer['save_s']:.2f}x | {row['save_load_s'] / peer['save_load_s']:.2f}x |"
        )
    _write(args, "many-tensors-dcp", {"summary": summary, "runs": runs}, load_start, load_end)
    return 0


def _write(args: argparse.Namespace, name: str, data: dict, load_start, load_end) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "load": [load_start, load_end]}
    path.write_text(json.dumps({**record, **data}, indent=1))
    print(f"wrote {path}")


def _run(pythonpath: str | None, args: argparse.Namespace, root: Path) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-c", _CHILD, str(args.tensors), str(args.numel), str(args.saves)]
    with tempfile.TemporaryDirectory(dir=root.resolve()) as d:
        # cwd: with -c the working directory comes first on sys.path, ahead of PYTHONPATH
        done = subprocess.run([*cmd, d], env=env, cwd=d, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.many_tensors", description=__doc__)
    p.add_argument("--tensors", type=int, default=100_000)
    p.add_argument("--numel", type=int, default=16, help="float32 elements per tensor")
    p.add_argument("--saves", type=int, default=5, help="saves per mode; the first is dropped")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compare-with", type=Path, help="another checkout to run beside this one")
    p.add_argument("--dir", type=Path, default=Path(".bench-tmp"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument(
        "--vs-dcp",
        action="store_true",
        help="instead: the first save and save + load of ours against DCP's (sync and async)",
    )
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.vs_dcp:
        return vs_dcp(args)
    variants = {"this": None}
    if args.compare_with:
        variants = {"other": str(args.compare_with.resolve()), **variants}
    load_start = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, path in variants.items():
            runs[name].append(_run(path, args, args.dir))
            print(f"[round {r + 1}/{args.rounds}] {name} done", file=sys.stderr, flush=True)
    load_end = os.getloadavg()

    def med(name: str, *keys: str) -> float:
        values = []
        for run in runs[name]:
            v = run
            for k in keys:
                v = v[k]
            values.extend(v)
        return statistics.median(values)

    print(f"# {args.tensors} tensors of {args.numel} float32, process executor")
    print(f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end; medians, ms\n")
    print("| variant | back, sync | back, async | commit, sync | copy_ loop | foreach copy |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name in variants:
        row = {
            "back_sync": med(name, "sync", "back_s"),
            "back_async": med(name, "async", "back_s"),
            "commit_sync": med(name, "sync", "commit_s"),
            "copy_loop": med(name, "copy_loop_s"),
            "foreach_copy": med(name, "foreach_copy_s"),
        }
        summary[name] = row
        print(f"| {name} | " + " | ".join(f"{v * 1e3:.0f}" for v in row.values()) + " |")
    this = summary["this"]
    print(f"\nsync back / copy_ loop: {this['back_sync'] / this['copy_loop']:.2f}x")
    _write(args, "many-tensors", {"summary": summary, "runs": runs}, load_start, load_end)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
