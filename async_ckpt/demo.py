"""``make demo``: train, checkpoint asynchronously, crash, resume where the crash left off.

Run 1 (a child process) trains a small MLP on a synthetic regression task,
saving every ``--save-every`` steps through a :class:`CheckpointManager`, and
dies abruptly (``os._exit``) at ``--crash-at``. Run 2 builds a fresh model and
optimizer, restores the newest committed checkpoint and trains on; the losses
of the steps both runs trained must be identical, bit for bit (exit 1 if not).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .manager import CheckpointManager
from .tools.report import human_bytes, steps_lines

CRASH_EXIT = 3
FEATURES, HIDDEN, BATCH, SAMPLES = 32, 256, 64, 4096


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and its optimizer, initialized from ``seed``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, 1),
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic regression task: y = sin(x @ w) + noise."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(SAMPLES, FEATURES, generator=gen)
    w = torch.randn(FEATURES, 1, generator=gen) / FEATURES**0.5
    return x, torch.sin(3 * x @ w) + 0.05 * torch.randn(SAMPLES, 1, generator=gen)


def train_step(model: Any, optim: Any, data: tuple, step: int) -> float:
    """One step on the batch of ``step`` (drawn from the step number, so a resumed run sees
    the same batches); returns the loss before the update."""
    x, y = data
    idx = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(step))[:BATCH]
    loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return loss.item()


def _committed(stats: Any) -> None:
    name = Path(stats.checkpoint_id).name
    print(
        f"      committed {name}: {human_bytes(stats.bytes)} in {stats.total_s * 1e3:.0f} ms "
        "(written by the worker while training went on)",
        flush=True,
    )


def train(
    manager: CheckpointManager, state: dict, first: int, last: int, losses: dict[int, float]
) -> None:
    """Train steps ``first..last`` (inclusive), saving through ``manager``, printing each save."""
    data = dataset()
    times: list[float] = []
    for step in range(first, last + 1):
        t0 = time.perf_counter()
        losses[step] = train_step(state["model"], state["optim"], data, step)
        times.append(time.perf_counter() - t0)
        state["step"] = step
        future = manager.maybe_save(step, state)
        if future is not None:
            mean_ms = sum(times) / len(times) * 1e3
            print(
                f"  step {step:4d}  loss {losses[step]:.6f}  save stall "
                f"{future.stats.stall_s * 1e3:6.2f} ms  (mean step {mean_ms:.2f} ms)",
                flush=True,
            )
            times.clear()


def _manager(args: argparse.Namespace, **kwargs: Any) -> CheckpointManager:
    return CheckpointManager(
        Path(args.dir) / "ckpts",
        save_every=args.save_every,
        keep_last=args.keep_last,
        executor=args.executor,
        **kwargs,
    )


def crash_run(args: argparse.Namespace) -> int:
    """Run 1 (child process): train from scratch and die abruptly at ``--crash-at``."""
    model, optim = build(seed=0)
    state = {"model": model, "optim": optim, "step": 0}
    losses: dict[int, float] = {}
    manager = _manager(args, on_saved=_committed)
    manager.checkpointer.start()  # spawn the worker now, not at the first save
    (Path(args.dir) / "worker.pid").write_text(str(manager.checkpointer.worker_pid or ""))
    train(manager, state, 1, args.crash_at, losses)
    (Path(args.dir) / "losses.json").write_text(json.dumps(losses))
    print(f"  step {args.crash_at:4d}  *** simulated crash: os._exit, no clean-up ***", flush=True)
    os._exit(CRASH_EXIT)


def _wait_gone(pid_file: Path, timeout: float = 30.0) -> None:
    """Wait until the crashed run's worker is gone (it finishes the save it had in hand)."""
    import psutil

    text = pid_file.read_text().strip() if pid_file.exists() else ""
    if not text:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(int(text)).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)


def resume_run(args: argparse.Namespace) -> int:
    """Run 2: restore the newest committed step into a fresh model and train to the end."""
    run1 = {int(k): v for k, v in json.loads((Path(args.dir) / "losses.json").read_text()).items()}
    model, optim = build(seed=1)  # different weights: the restore must replace them all
    state = {"model": model, "optim": optim, "step": 0}
    with _manager(args, on_saved=_committed) as manager:
        if manager.latest_step() is None:
            print("no committed checkpoint survived the crash; nothing to resume", flush=True)
            return 1
        manager.checkpointer.start()
        start = manager.restore(state)
        print(f"  restored step {start} (state['step'] = {state['step']})", flush=True)
        losses: dict[int, float] = {}
        train(manager, state, start + 1, args.steps, losses)
        manager.wait()
    both = list(range(start + 1, args.crash_at + 1))
    first = start + 1
    print(
        f"\nloss at step {first}, the first step after the restore:\n"
        f"  run 1 (before the crash) {run1[first]!r}\n"
        f"  run 2 (resumed)          {losses[first]!r}",
        flush=True,
    )
    differ = [s for s in both if run1[s] != losses[s]]
    if differ:
        print(f"MISMATCH: the runs disagree on steps {differ[:10]}", flush=True)
        return 1
    print(
        f"identical on all {len(both)} steps both runs trained ({first}..{args.crash_at}); "
        f"final loss at step {args.steps}: {losses[args.steps]:.6f}",
        flush=True,
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m async_ckpt.demo", description=__doc__)
    parser.add_argument("--dir", help="where checkpoints go (default: a temporary directory)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--crash-at", type=int, default=230)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--executor", choices=["process", "thread"], default="process")
    parser.add_argument("--phase", choices=["all", "crash"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.save_every <= args.crash_at < args.steps:
        parser.error("need --save-every <= --crash-at < --steps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in both runs, whatever the machine
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("      [async_ckpt %(levelname)s] %(message)s"))
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("async_ckpt")
    logger.addHandler(handler)
    temp = None
    try:
        if args.phase == "crash":
            return crash_run(args)
        if args.dir is None:
            args.dir = temp = tempfile.mkdtemp(prefix="async_ckpt-demo-")
        return _run_all(args)
    finally:
        logger.removeHandler(handler)
        torch.set_num_threads(threads)
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def _run_all(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    params = sum(p.numel() for p in build(0)[0].parameters())
    print(
        f"async_ckpt demo: MLP {FEATURES}-{HIDDEN}-{HIDDEN}-1 ({params:,} parameters, Adam), "
        f"{args.steps} steps, a checkpoint every {args.save_every} steps "
        f"(keep_last={args.keep_last}, executor={args.executor!r}) under {args.dir}/ckpts\n"
        f"\nrun 1: training from scratch; it will crash at step {args.crash_at}",
        flush=True,
    )
    root = str(Path(__file__).resolve().parents[1])
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    child = [sys.executable, "-m", "async_ckpt.demo", "--phase", "crash"]
    child += ["--dir", args.dir, "--steps", str(args.steps), "--save-every", str(args.save_every)]
    child += ["--crash-at", str(args.crash_at), "--keep-last", str(args.keep_last)]
    child += ["--executor", args.executor]
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(args.dir) / "run1.stderr"
    with open(log_path, "wb") as log_file:  # also the orphaned worker's, after the crash
        code = subprocess.run(child, env=env, stderr=log_file, check=False).returncode
    if code != CRASH_EXIT:
        print(f"run 1 ended with exit code {code}, not the simulated crash:", flush=True)
        print(log_path.read_text(errors="replace")[-4000:], flush=True)
        return 1
    _wait_gone(Path(args.dir) / "worker.pid")
    print("\non disk after the crash (`async-ckpt ls`):", flush=True)
    from .manager import StepStore

    for line in steps_lines(f"{args.dir}/ckpts", StepStore(Path(args.dir) / "ckpts").infos()):
        print(f"  {line}" if line else "", flush=True)
    print(
        "\nrun 2: a fresh model and optimizer, restored from the newest committed step", flush=True
    )
    code = resume_run(args)
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
