"""`make demo` end to end, shortened: train, crash in a child process, resume, same losses."""

from __future__ import annotations

from pathlib import Path

import pytest

from async_ckpt import demo
from async_ckpt.manager import CheckpointManager


@pytest.mark.multiprocess
def test_demo_resumes_with_identical_losses(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    argv = ["--steps", "30", "--save-every", "10", "--crash-at", "25", "--dir", str(tmp_path)]
    code = demo.main(argv)
    out, _ = capfd.readouterr()
    assert code == 0, out
    assert "simulated crash" in out
    assert "save stall" in out and "mean step" in out
    assert "restored step 20" in out
    assert "identical on all 5 steps" in out
    first = next(line for line in out.splitlines() if "run 1 (before the crash)" in line)
    again = next(line for line in out.splitlines() if "run 2 (resumed)" in line)
    assert first.split()[-1] == again.split()[-1]
    with CheckpointManager(tmp_path / "ckpts", executor="thread") as manager:
        assert manager.steps() == [20, 30]  # keep_last=2


def test_demo_rejects_a_crash_before_the_first_save() -> None:
    with pytest.raises(SystemExit):
        demo.parse_args(["--save-every", "50", "--crash-at", "10"])
