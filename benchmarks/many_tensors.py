"""Many small tensors: the caller's per-tensor cost, against the raw copy of the same tensors.

    python -m benchmarks.many_tensors [--tensors 100000 --numel 16 --saves 5 --rounds 2]
    python -m benchmarks.many_tensors --compare-with /path/to/other/checkout

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
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
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
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"many-tensors-{stamp}.json"
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "load": [load_start, load_end]}
    path.write_text(json.dumps({**record, "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
