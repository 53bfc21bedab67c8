"""Lightning training with four checkpoint set-ups, side by side, interleaved.

    python -m benchmarks.lightning_bench [--hidden 1024 --layers 8 --steps 30 --every 10]
    python -m benchmarks.lightning_bench --smoke      # a few seconds: the set-up works

One process trains the same MLP (AdamW) on the CPU, round after round, each
round fitting once per method (A B C D A B C D ...), so a shared machine's
drift hits all of them alike:

- ``none``: no checkpointing (the step time to compare with);
- ``torch``: Lightning's default ``TorchCheckpointIO`` (``torch.save``, no fsync);
- ``lightning_async``: Lightning's ``AsyncCheckpointIO`` around it (clones the
  tensors, then ``torch.save`` in a thread of the training process);
- ``async_ckpt``: ``AsyncCkptIO`` (staged into shared memory, written and
  fsynced by a worker process), ``start()``-ed before the fit as docs/lightning.md
  recommends (and waited for: a long run's worker is up by its first save).

A ``ModelCheckpoint(every_n_train_steps=--every, save_top_k=1)`` saves (and
removes the previous checkpoint). Per method: the median step time without
a save in it (what the background write costs training; also its lower
quartile, since other tenants' load comes in bursts), the step with a save,
the time ``save_checkpoint`` blocked per save, the wait at teardown, and the
whole fit. The JSON goes to ``--out/lightning-<stamp>.json``
with the machine's description and load average, the table to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks import report
from benchmarks.metrics import fmt_bytes

METHODS = ("none", "torch", "lightning_async", "async_ckpt")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.lightning_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hidden", type=int, default=1024, help="width of each layer")
    p.add_argument("--layers", type=int, default=8, help="hidden layers of the MLP")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="training steps per fit")
    p.add_argument("--every", type=int, default=10, help="save every N steps")
    p.add_argument("--rounds", type=int, default=3, help="fits per method (interleaved)")
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS)
    )
    p.add_argument("--dir", type=Path, default=Path(".bench-tmp"), help="checkpoints go here")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--smoke", action="store_true", help="tiny model, 1 round: checks the set-up")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.batch, args.steps, args.every, args.rounds = (
            64,
            2,
            16,
            8,
            4,
            1,
        )
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods: {', '.join(sorted(unknown))}")
    return args


def _lightning() -> Any:
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    import pytorch_lightning as pl

    return pl


def build(args: argparse.Namespace, pl: Any) -> tuple[Any, Any, Any]:
    """The model class, the timing callback class and the timed CheckpointIO wrapper."""
    from lightning_fabric.plugins import CheckpointIO
    from torch.utils.data import DataLoader, TensorDataset

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            dims = [args.hidden] * (args.layers + 1)
            layers: list[torch.nn.Module] = []
            for a, b in zip(dims, dims[1:], strict=False):
                layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
            self.net = torch.nn.Sequential(*layers, torch.nn.Linear(args.hidden, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

        def train_dataloader(self) -> DataLoader:
            g = torch.Generator().manual_seed(0)
            n = args.batch * 4
            data = TensorDataset(
                torch.randn(n, args.hidden, generator=g), torch.randn(n, 1, generator=g)
            )
            return DataLoader(data, batch_size=args.batch)

    class StepTimes(pl.Callback):
        """Start of every step; a step's time runs to the next start (saves included)."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.end = 0.0

        def on_train_batch_start(self, *a: Any) -> None:
            self.starts.append(time.perf_counter())

        def on_train_end(self, *a: Any) -> None:
            self.end = time.perf_counter()

    class Timed(CheckpointIO):
        """Forwards to ``inner``; times each call that can block training."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.blocked: list[float] = []
            self.saved_at: list[float] = []
            self.teardown_s = 0.0

        def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            t0 = time.perf_counter()
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
            self.blocked.append(time.perf_counter() - t0)
            self.saved_at.append(t0)

        def load_checkpoint(self, *a: Any, **k: Any) -> Any:
            return self.inner.load_checkpoint(*a, **k)

        def remove_checkpoint(self, path: Any) -> None:
            self.inner.remove_checkpoint(path)

        def teardown(self) -> None:
            t0 = time.perf_counter()
            self.inner.teardown()
            self.teardown_s += time.perf_counter() - t0

    return MLP, StepTimes, Timed


def make_io(method: str, commits: list[Any]) -> Any:
    from lightning_fabric.plugins import TorchCheckpointIO
    from pytorch_lightning.plugins import AsyncCheckpointIO

    from async_ckpt.integrations.lightning import AsyncCkptIO

    if method == "torch":
        return TorchCheckpointIO()
    if method == "lightning_async":
        return AsyncCheckpointIO(TorchCheckpointIO())
    if method == "async_ckpt":
        io = AsyncCkptIO(on_saved=commits.append)
        io.start(wait=True)  # as a long run would find it by its first save
        return io
    raise ValueError(method)


def one_fit(method: str, args: argparse.Namespace, parts: tuple, pl: Any, root: Path) -> dict:
    from pytorch_lightning.callbacks import ModelCheckpoint

    MLP, StepTimes, Timed = parts
    steps = StepTimes()
    commits: list[Any] = []
    callbacks: list[Any] = [steps]
    plugins: list[Any] = []
    io = None
    if method != "none":
        io = Timed(make_io(method, commits))
        plugins.append(io)
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=args.every))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        plugins=plugins,
        callbacks=callbacks,
        enable_checkpointing=method != "none",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = MLP()
    t0 = time.perf_counter()
    trainer.fit(model)
    fit_s = time.perf_counter() - t0
    marks = [*steps.starts, steps.end]
    durations = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    saved_at = io.saved_at if io else []
    # a step "has a save" when a save started between its start and the next step's
    with_save = [any(a <= s < b for s in saved_at) for a, b in zip(marks, marks[1:], strict=False)]
    out = {
        "fit_s": fit_s,
        "step_s": durations,
        "step_has_save": with_save,
        "blocked_s": io.blocked if io else [],
        "teardown_s": io.teardown_s if io else 0.0,
        "loadavg": os.getloadavg(),
    }
    if commits:
        out["commit_s"] = [s.total_s for s in commits]
        out["write_s"] = [s.write_s for s in commits]
        out["bytes"] = commits[-1].bytes
    return out


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _p25(xs: list[float]) -> float | None:
    return statistics.quantiles(xs, n=4)[0] if len(xs) >= 2 else _median(xs)


def summarize(runs: list[dict]) -> dict[str, Any]:
    # the first step of each fit warms up (allocations, first save's set-up): left out
    pairs = [p for r in runs for p in list(zip(r["step_s"], r["step_has_save"], strict=True))[1:]]
    plain = [d for d, saved in pairs if not saved]
    saving = [d for d, saved in pairs if saved]
    blocked = [b for r in runs for b in r["blocked_s"]]
    later = [b for r in runs for b in r["blocked_s"][1:]]
    return {
        "step_plain_median_s": _median(plain),
        # Other tenants' bursts make steps several times slower for seconds at a time;
        # the lower quartile shows the steps that ran on a quiet machine.
        "step_plain_p25_s": _p25(plain),
        "step_with_save_median_s": _median(saving),
        "step_mean_s": statistics.fmean(d for d, _ in pairs) if pairs else None,
        "blocked_per_save_median_s": _median(later or blocked),
        "blocked_first_save_s": _median([r["blocked_s"][0] for r in runs if r["blocked_s"]]),
        "blocked_max_s": max(blocked) if blocked else None,
        "teardown_median_s": _median([r["teardown_s"] for r in runs]),
        "fit_median_s": _median([r["fit_s"] for r in runs]),
        "commit_median_s": _median([c for r in runs for c in r.get("commit_s", [])]),
    }


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1e3:.0f}"


def table(result: dict[str, Any]) -> str:
    lines = [
        f"# Lightning checkpointing {result['started']}",
        "",
        report.machine_header(result["machine"]),
        "",
        f"MLP {result['config']['layers']}x{result['config']['hidden']}, AdamW, batch "
        f"{result['config']['batch']}; checkpoint {fmt_bytes(result['checkpoint_bytes'])}; "
        f"{result['config']['steps']} steps per fit, a save every {result['config']['every']}, "
        f"{result['config']['rounds']} interleaved rounds. Times in ms.",
        "",
        "| method | step without a save: median / lower quartile | step with a save (median) "
        "| blocked per save (median) | first save | teardown | fit (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in result["summary"].items():
        lines.append(
            f"| {name} | {_ms(s['step_plain_median_s'])} / {_ms(s['step_plain_p25_s'])} | "
            f"{_ms(s['step_with_save_median_s'])} | {_ms(s['blocked_per_save_median_s'])} | "
            f"{_ms(s['blocked_first_save_s'])} | {_ms(s['teardown_median_s'])} | "
            f"{_ms(s['fit_median_s'])} |"
        )
    commit = result["summary"].get("async_ckpt", {}).get("commit_median_s")
    if commit is not None:
        lines += ["", f"async_ckpt: median {commit * 1e3:.0f} ms from save call to durable commit."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pl = _lightning()
    parts = build(args, pl)
    args.dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="lightning-bench-", dir=args.dir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {
        "started": stamp,
        "argv": sys.argv,
        "config": {k: v for k, v in vars(args).items() if k not in ("dir", "out")},
        "machine": report.machine_info(scratch),
        "runs": {m: [] for m in args.methods},
    }
    try:
        for round_no in range(args.rounds):
            for method in args.methods:
                root = scratch / f"{method}-{round_no}"
                rec = one_fit(method, args, parts, pl, root)
                result["runs"][method].append(rec)
                print(
                    f"[round {round_no + 1}/{args.rounds}] {method:16s} fit {rec['fit_s']:.2f} s, "
                    f"blocked {sum(rec['blocked_s']):.2f} s over {len(rec['blocked_s'])} saves",
                    file=sys.stderr,
                    flush=True,
                )
                shutil.rmtree(root, ignore_errors=True)
    finally:
        result["machine"]["loadavg_end"] = os.getloadavg()
        shutil.rmtree(scratch, ignore_errors=True)
    result["summary"] = {m: summarize(runs) for m, runs in result["runs"].items()}
    ours = [r["bytes"] for r in result["runs"].get("async_ckpt", []) if "bytes" in r]
    model = parts[0]()
    nparams = sum(p.numel() * p.element_size() for p in model.parameters())
    result["checkpoint_bytes"] = ours[0] if ours else 3 * nparams  # weights + AdamW moments
    md = table(result)
    print(md)
    path = args.out / f"lightning-{stamp}.json"
    report.write_json(result, path)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
