"""CheckpointManager resume after a kill: a training job SIGKILLed mid-run, restarted
from its newest committed step, ends bit-identical to a run never interrupted."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tensor_bytes

TRAIN = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from async_ckpt.manager import CheckpointManager

    torch.set_num_threads(1)

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    def step_fn(model, optim, step):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(16, 8, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True).sin()).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()

    def run(root, first, last, state, kill_at=None, every=4):
        with CheckpointManager(root, save_every=every, keep_last=2, executor="thread") as mgr:
            if first is None:
                first = mgr.restore(state) + 1
            for step in range(first, last + 1):
                step_fn(state["model"], state["optim"], step)
                state["step"] = step
                mgr.maybe_save(step, state)
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

    if __name__ == "__main__":
        model, optim = build()
        run(sys.argv[1], 1, int(sys.argv[2]), {"model": model, "optim": optim, "step": 0},
            kill_at=int(sys.argv[3]))
    """
)


@pytest.mark.multiprocess
def test_resume_after_kill_is_bit_identical(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    namespace: dict[str, Any] = {"__name__": "train"}
    threads = torch.get_num_threads()
    try:
        exec(compile(TRAIN, str(script), "exec"), namespace)  # sets 1 thread, like the child
        total = 22
        # killed one step after the step-16 save started: it may or may not have committed
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ck"), "22", "17"])
        assert proc.returncode == -signal.SIGKILL
        model, optim = namespace["build"]()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # a different start: the restore must overwrite everything
        resumed = {"model": model, "optim": optim, "step": 0}
        namespace["run"](tmp_path / "ck", None, total, resumed)
        assert resumed["step"] == total

        model, optim = namespace["build"]()
        reference = {"model": model, "optim": optim, "step": 0}
        namespace["run"](tmp_path / "ref", 1, total, reference)
    finally:
        torch.set_num_threads(threads)
    for (name, a), (_, b) in zip(
        resumed["model"].state_dict().items(), reference["model"].state_dict().items(), strict=True
    ):
        assert tensor_bytes(a) == tensor_bytes(b), name
    opt_a, opt_b = resumed["optim"].state_dict()["state"], reference["optim"].state_dict()["state"]
    for index in opt_b:
        for name in opt_b[index]:
            assert tensor_bytes(opt_a[index][name]) == tensor_bytes(opt_b[index][name])
