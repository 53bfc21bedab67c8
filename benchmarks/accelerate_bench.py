"""Accelerate: ``Accelerator.save_state`` vs async_ckpt's ``AcceleratorCheckpointer.save_state``.

One process, one ``Accelerator`` (CPU), one small MLP trained with AdamW and
a scheduler; the two saves run interleaved (A B A B ...), with an optimizer
step before each, so a drifting shared disk hits both alike:

- ``accelerate``: ``accelerator.save_state(dir)`` (safetensors model, torch.save
  for the rest). It returns once the files are written, not durable:
  ``durable`` adds an fsync of every file it wrote and of the directory.
- ``async_ckpt``: ``AcceleratorCheckpointer.save_state(dir)`` after ``start()`` (a
  process-executor worker and staging memory ready); it returns once staged, and
  ``future.result()`` once it is fsynced and committed.

Reported per save: ``blocked`` (the call's duration: the training stall) and
``total`` (until the checkpoint is durable); steady state is the median of
runs 2..N, run 1 shown apart. The last async_ckpt checkpoint is loaded back
and checked against the parameters it was saved from.

    python -m benchmarks.accelerate_bench                       # ~100 MB of state
    python -m benchmarks.accelerate_bench --width 2048 --repeats 7 --dir .bench-tmp
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import report
from benchmarks.metrics import fmt_bytes, summarize

now = time.perf_counter


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.accelerate_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--width", type=int, default=1024, help="hidden size of the MLP")
    p.add_argument("--layers", type=int, default=8, help="Linear(width, width) layers")
    p.add_argument("--repeats", type=int, default=5, help="saves per method (>= 2)")
    p.add_argument("--dir", type=Path, default=Path(".bench-tmp"), help="where saves go")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="JSON goes here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.width < 1 or args.layers < 1:
        p.error("--repeats, --width and --layers must be >= 1")
    return args


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories themselves."""
    for folder, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for s in opt.state_dict()["state"].values():
        n += sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v))
    return n


def _row(runs: list[dict[str, float]], key: str) -> str:
    s = summarize([r[key] for r in runs])
    if s is None:
        return "—"
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}); first {s['first']:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator

    from async_ckpt.integrations.accelerate import AcceleratorCheckpointer

    args.dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="accel-bench-", dir=args.dir))  # ours alone
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {
        "started": stamp,
        "argv": sys.argv,
        "repeats": args.repeats,
        "machine": report.machine_info(scratch),
    }
    torch.manual_seed(args.seed)
    acc = Accelerator(cpu=True)
    layers: list[torch.nn.Module] = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, sched = acc.prepare(model, opt, sched)
    x = torch.randn(8, args.width)

    def train_step() -> None:  # every tensor of the state changes
        acc.backward(model(x).pow(2).mean())
        opt.step()
        sched.step()
        opt.zero_grad()

    train_step()
    nbytes = _state_bytes(acc.unwrap_model(model), opt)
    result["config"] = {"width": args.width, "layers": args.layers, "state_bytes": nbytes}
    log(f"state: {fmt_bytes(nbytes)} (model + AdamW moments), {args.repeats} saves per method")
    runs: dict[str, list[dict[str, float]]] = {"accelerate": [], "async_ckpt": []}
    ours = AcceleratorCheckpointer(acc)
    try:
        ours.start()  # worker and staging memory, outside the timed region
        expected: list[torch.Tensor] = []
        for rep in range(args.repeats):
            train_step()
            path = scratch / f"accelerate-{rep}"
            t0 = now()
            acc.save_state(str(path))
            t1 = now()
            _fsync_tree(path)
            t2 = now()
            runs["accelerate"].append(
                {"blocked_s": t1 - t0, "total_s": t1 - t0, "durable_s": t2 - t0}
            )
            shutil.rmtree(path)

            train_step()
            path = scratch / f"async_ckpt-{rep}"
            expected = [p.detach().clone() for p in acc.unwrap_model(model).parameters()]
            t0 = now()
            fut = ours.save_state(path)
            t1 = now()
            fut.result()
            t2 = now()
            runs["async_ckpt"].append(
                {
                    "blocked_s": t1 - t0,
                    "total_s": t2 - t0,
                    "durable_s": t2 - t0,
                    "stall_s": fut.stats.stall_s,
                    "write_s": fut.stats.write_s,
                }
            )
            if rep + 1 < args.repeats:
                shutil.rmtree(path)
            log(
                f"[{rep + 1}/{args.repeats}] accelerate blocked "
                f"{runs['accelerate'][-1]['blocked_s']:.3f} s (durable "
                f"{runs['accelerate'][-1]['durable_s']:.3f} s); async_ckpt blocked "
                f"{t1 - t0:.3f} s, committed {t2 - t0:.3f} s"
            )
        train_step()
        ours.load_state(path)  # the last checkpoint restores what it was saved from
        got = list(acc.unwrap_model(model).parameters())
        if not all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)):
            raise AssertionError("the loaded checkpoint differs from the saved parameters")
    finally:
        ours.close()
        result["machine"]["loadavg_end"] = os.getloadavg()
        shutil.rmtree(scratch, ignore_errors=True)
    result["runs"] = runs
    result["summary"] = {
        name: {key: summarize([r[key] for r in rs]) for key in rs[0]} for name, rs in runs.items()
    }
    acc_blocked = result["summary"]["accelerate"]["blocked_s"]["median"]
    our_blocked = result["summary"]["async_ckpt"]["blocked_s"]["median"]
    acc_durable = result["summary"]["accelerate"]["durable_s"]["median"]
    our_total = result["summary"]["async_ckpt"]["total_s"]["median"]
    result["ratios"] = {
        "blocked_accelerate_over_ours": acc_blocked / our_blocked,
        "durable_accelerate_over_ours": acc_durable / our_total,
    }
    lines = [
        f"# Accelerate save_state vs async_ckpt ({stamp})",
        "",
        report.machine_header(result["machine"]),
        f"- state: {fmt_bytes(nbytes)} ({args.layers} x Linear({args.width}, {args.width}) "
        f"+ AdamW), {args.repeats} saves each, interleaved",
        "",
        "Seconds: median (min-max) of runs 2..N; first = run 1.",
        "",
        "| method | blocked (training stall) | until durable |",
        "|---|---|---|",
        f"| accelerate `save_state` | {_row(runs['accelerate'], 'blocked_s')} "
        f"| {_row(runs['accelerate'], 'durable_s')} (returns before: not fsynced) |",
        f"| async_ckpt `AcceleratorCheckpointer.save_state` "
        f"| {_row(runs['async_ckpt'], 'blocked_s')} "
        f"| {_row(runs['async_ckpt'], 'total_s')} (committed) |",
        "",
        f"Blocked: accelerate / async_ckpt = {result['ratios']['blocked_accelerate_over_ours']:.1f}x; "
        f"until durable: {result['ratios']['durable_accelerate_over_ours']:.2f}x.",
    ]
    md = "\n".join(lines)
    print(md)
    out = args.out / f"accelerate-{stamp}.json"
    report.write_json(result, out)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
