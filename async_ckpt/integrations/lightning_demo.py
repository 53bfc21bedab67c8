"""Lightning with asynchronous checkpoints: train, save as training goes on, resume.

``python -m async_ckpt.integrations.lightning_demo [--dir DIR]`` trains a small
model for a few steps on the CPU with ``AsyncCkptIO`` and a ``ModelCheckpoint``
(a checkpoint every 2 steps, the best 2 by training loss, and last.ckpt),
then starts a new Trainer from ``ckpt_path="last"`` and checks that training
continued from the saved step with the saved optimizer state.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ..materialize import materialize
from .lightning import AsyncCkptIO


class Regressor(pl.LightningModule):
    """A two-layer regressor on random data: 8 steps per epoch."""

    def __init__(self, hidden: int = 64, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(256, 32, generator=g), torch.randn(256, 1, generator=g))
        return DataLoader(data, batch_size=32)


class _StartState(Callback):
    """Records the step and the optimizer's first moment a (resumed) fit starts from."""

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.step = trainer.global_step
        state = trainer.optimizers[0].state_dict()["state"]
        self.exp_avg = state[0]["exp_avg"].clone() if state else None


def _trainer(steps: int, root: str, *callbacks: Callback, stalls: list | None = None) -> pl.Trainer:
    io = AsyncCkptIO(on_saved=None if stalls is None else (lambda s: stalls.append(s.stall_s)))
    io.start()  # the worker imports torch while Lightning sets up
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        plugins=[io],
        callbacks=[
            ModelCheckpoint(
                dirpath=root,
                monitor="train_loss",
                save_top_k=2,
                every_n_train_steps=2,
                save_last=True,
            ),
            *callbacks,
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def run(root: str, steps: int = 6, more: int = 4) -> None:
    t0 = time.perf_counter()
    stalls: list[float] = []
    trainer = _trainer(steps, root, stalls=stalls)
    model = Regressor()
    trainer.fit(model)
    saved_avg = trainer.optimizers[0].state_dict()["state"][0]["exp_avg"].clone()
    names = sorted(os.listdir(root))
    print(
        f"trained {trainer.global_step} steps in {time.perf_counter() - t0:.1f} s; "
        f"each save blocked training for {1e3 * max(stalls, default=0):.1f} ms at most"
    )
    print("checkpoints:")
    for name in names:
        stored = materialize(os.path.join(root, name))
        print(f"  {name:28s} global_step={stored['global_step']}")

    start = _StartState()
    resumed = _trainer(steps + more, root, start)
    resumed.fit(Regressor(), ckpt_path="last")
    if start.step != steps or start.exp_avg is None or not torch.equal(start.exp_avg, saved_avg):
        raise SystemExit(
            f"resume failed: started at step {start.step}, expected {steps} with the saved "
            "optimizer state"
        )
    print(
        f"resumed from last.ckpt at step {start.step} (optimizer state identical), "
        f"trained on to step {resumed.global_step}"
    )
    assert isinstance(resumed.checkpoint_callback, ModelCheckpoint)
    best_path = resumed.checkpoint_callback.best_model_path
    best = Regressor.load_from_checkpoint(best_path)
    print(
        f"load_from_checkpoint({os.path.basename(best_path)!r}): the best model by train_loss, "
        f"hidden={best.hparams['hidden']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="checkpoint directory (default: a temporary one)")
    args = parser.parse_args(argv)
    # Lightning's start-up notices (no GPU, few dataloader workers) are not the demo's subject
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    if args.dir:
        run(args.dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(os.path.join(tmp, "checkpoints"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
