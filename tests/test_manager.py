"""CheckpointManager: intervals, retention (also under failure), crash clean-up, restore.

A training job killed mid-run and resumed through the manager is in
tests/test_manager_resume.py.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import async_ckpt
from async_ckpt.errors import CheckpointError, CheckpointNotFoundError
from async_ckpt.manager import INCOMPLETE_GRACE_S, CheckpointManager
from async_ckpt.storage.local import FileSystemWriter


def _state(value: float = 0.0) -> dict[str, Any]:
    return {"w": torch.full((64,), value), "step": 0}


def _manager(root: Any, **kwargs: Any) -> CheckpointManager:
    kwargs.setdefault("executor", "thread")
    return CheckpointManager(root, **kwargs)


def _age(path: Path, seconds: float = 2 * INCOMPLETE_GRACE_S) -> None:
    """Set the modification times of ``path`` and everything below it ``seconds`` back."""
    stamp = time.time() - seconds
    for folder, _, names in os.walk(path):
        for name in names:
            os.utime(os.path.join(folder, name), (stamp, stamp))
        os.utime(folder, (stamp, stamp))


def _save_steps(manager: CheckpointManager, steps: range) -> None:
    for step in steps:
        manager.save(step, {"w": torch.full((64,), float(step)), "step": step})
    manager.wait()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Control writes per step directory: ``writes["fail"]`` raises, ``writes["hold"]``
    blocks until its event is set, and ``writes["reached"]`` events are set as soon as a
    write to that step directory begins (its directory exists by then).

    Held writes are let go at teardown, so no save waits on a test that failed.
    """
    control: dict[str, Any] = {"fail": set(), "hold": {}, "reached": {}}
    original = FileSystemWriter.write_file

    def write_file(self: FileSystemWriter, name: str, segments: Any) -> None:
        step_dir = self.path.name
        if step_dir in control["reached"]:
            control["reached"][step_dir].set()
        if step_dir in control["fail"]:
            raise OSError(f"injected write failure in {step_dir}")
        if step_dir in control["hold"]:
            control["hold"][step_dir].wait(120)
        return original(self, name, segments)

    monkeypatch.setattr(FileSystemWriter, "write_file", write_file)
    yield control
    for release in control["hold"].values():
        release.set()


# ------------------------------------------------------------------------------ intervals


def test_maybe_save_every_n_steps(tmp_path: Path) -> None:
    with _manager(tmp_path, save_every=5, keep_last=None) as manager:
        futures = {s: manager.maybe_save(s, _state(s)) for s in range(1, 13)}
        manager.wait()
        assert [s for s, f in futures.items() if f is not None] == [5, 10]
        assert manager.steps() == [5, 10]
        assert manager.latest_step() == 10
        assert (tmp_path / "step-00000010" / "metadata.json").is_file()


def test_maybe_save_needs_save_every(tmp_path: Path) -> None:
    with _manager(tmp_path) as manager, pytest.raises(CheckpointError, match="save_every"):
        manager.maybe_save(1, _state())


def test_maybe_save_skips_the_step_just_restored(tmp_path: Path) -> None:
    with _manager(tmp_path, save_every=2) as manager:
        manager.save(4, _state(4.0))
        manager.wait()
    with _manager(tmp_path, save_every=2) as manager:
        assert manager.restore(_state()) == 4
        assert manager.maybe_save(4, _state()) is None
        assert manager.maybe_save(6, _state()) is not None


def test_never_two_saves_in_flight(tmp_path: Path, writes: dict[str, Any]) -> None:
    writes["hold"]["step-00000001"] = release = threading.Event()
    with _manager(tmp_path) as manager:
        first = manager.save(1, _state(1.0))
        threading.Timer(0.3, release.set).start()
        manager.save(2, _state(2.0))  # waits for the first save to commit
        assert first.done() and first.exception() is None
        manager.wait()
        assert manager.steps() == [1, 2]


@pytest.mark.parametrize(
    "kwargs",
    [{"keep_last": 0}, {"keep_every": -1}, {"save_every": 1.5}, {"keep_last": True}],
)
def test_invalid_settings(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(CheckpointError):
        _manager(tmp_path, **kwargs)


def test_invalid_step(tmp_path: Path) -> None:
    with _manager(tmp_path) as manager, pytest.raises(CheckpointError, match="step"):
        manager.save(-1, _state())


# ------------------------------------------------------------------------------ retention


def test_keep_last(tmp_path: Path) -> None:
    with _manager(tmp_path, keep_last=2) as manager:
        _save_steps(manager, range(1, 6))
        assert manager.steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def test_keep_last_none_keeps_everything(tmp_path: Path) -> None:
    with _manager(tmp_path, keep_last=None) as manager:
        _save_steps(manager, range(1, 6))
        assert manager.steps() == [1, 2, 3, 4, 5]


def test_keep_every_keeps_multiples_forever(tmp_path: Path) -> None:
    with _manager(tmp_path, keep_last=1, keep_every=3) as manager:
        _save_steps(manager, range(1, 11))
        assert manager.steps() == [3, 6, 9, 10]


def test_retention_runs_after_each_commit(tmp_path: Path) -> None:
    with _manager(tmp_path, keep_last=1) as manager:
        manager.save(1, _state())
        manager.save(2, _state())  # waits for step 1, whose commit triggered retention
        manager.save(3, _state())  # step 2 committed: step 1 goes
        assert 1 not in manager.steps()
        manager.wait()
        assert manager.steps() == [3]


def test_failed_save_keeps_last_committed(tmp_path: Path, writes: dict[str, Any]) -> None:
    with _manager(tmp_path, keep_last=1) as manager:
        _save_steps(manager, range(1, 2))
        writes["fail"].add("step-00000002")
        future = manager.save(2, _state(2.0))
        with pytest.raises(OSError, match="injected"):
            manager.wait()
        assert future.exception() is not None
        assert manager.steps() == [1]
        assert manager.retain() == []
        restored = _state()
        assert manager.restore(restored) == 1
        assert torch.equal(restored["w"], torch.full((64,), 1.0))
        # the failure was reported once; the next save goes ahead and retention resumes
        _save_steps(manager, range(3, 4))
        assert manager.steps() == [3]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]


def test_failed_save_error_surfaces_at_next_save(tmp_path: Path, writes: dict[str, Any]) -> None:
    with _manager(tmp_path, keep_last=1, save_every=1) as manager:
        _save_steps(manager, range(1, 2))
        writes["fail"].add("step-00000002")
        manager.maybe_save(2, _state())
        with pytest.raises(OSError, match="injected"):
            manager.maybe_save(3, _state())
        assert manager.steps() == [1]
        assert manager.maybe_save(3, _state()) is not None
        manager.wait()
        assert manager.steps() == [3]


def test_newest_committed_kept_while_newer_save_in_flight(
    tmp_path: Path, writes: dict[str, Any]
) -> None:
    with _manager(tmp_path, keep_last=1) as manager:
        _save_steps(manager, range(1, 2))
        writes["hold"]["step-00000002"] = release = threading.Event()
        writes["reached"]["step-00000002"] = writing = threading.Event()
        manager.save(2, _state(2.0))
        assert writing.wait(120), "the save of step 2 never began writing"
        assert (tmp_path / "step-00000002").is_dir()  # being written, and held there
        assert manager.retain() == []
        assert manager.steps() == [1]
        threading.Timer(0.2, release.set).start()
        assert manager.restore(_state()) == 2  # waits for the pending save first
        manager.wait()
        assert manager.steps() == [2]


def test_rewound_step_is_kept_and_newer_steps_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _manager(tmp_path, keep_last=2) as manager:
        _save_steps(manager, range(10, 13))
        assert manager.steps() == [11, 12]
        manager.restore(_state(), step=11)
        with caplog.at_level(logging.WARNING, logger="async_ckpt"):
            _save_steps(manager, range(5, 6))  # the newest save is kept, whatever its number
        assert manager.steps() == [5, 11, 12]
        assert "newer committed steps [11, 12]" in caplog.text


def _two_rank_body(rank: int, world_size: int, root: str) -> tuple[int, list[int], bool]:
    import torch.distributed as dist

    with CheckpointManager(root, keep_last=1, save_every=1, executor="thread") as manager:
        for step in range(1, 4):
            manager.maybe_save(step, {"w": torch.full((8,), float(step)), "rank_free": step})
    dist.barrier()
    restored = {"w": torch.zeros(8), "rank_free": 0}
    with CheckpointManager(root, executor="thread") as manager:
        step = manager.restore(restored)
        return manager.rank, manager.steps(), step == 3 and restored["w"][0].item() == 3.0


@pytest.mark.multiprocess
def test_two_ranks_share_one_root(tmp_path: Path) -> None:
    from dist_utils import run_ranks

    (tmp_path / "step-00000007").mkdir()  # an earlier crash's leftover
    _age(tmp_path / "step-00000007")
    results = run_ranks(_two_rank_body, 2, str(tmp_path))
    assert results == [(0, [3], True), (1, [3], True)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]


def test_only_rank0_deletes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "step-00000009").mkdir()
    monkeypatch.setattr("async_ckpt.manager.checkpoint_manager._group_rank", lambda checkpointer: 1)
    with _manager(tmp_path, keep_last=1) as manager:
        assert (tmp_path / "step-00000009").is_dir()  # no clean-up on rank 1
        _save_steps(manager, range(1, 4))
        assert manager.retain() == []
        assert manager.steps() == [1, 2, 3]


# ---------------------------------------------------------------------- crash and restore


def test_incomplete_leftovers_removed_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _manager(tmp_path, keep_last=None) as manager:
        _save_steps(manager, range(1, 3))
    leftover = tmp_path / "step-00000003"
    leftover.mkdir()
    (leftover / "0123abcd-r0-0.data").write_bytes(b"partial")
    _age(leftover)
    (tmp_path / "notes.txt").write_text("not ours")
    (tmp_path / "step-3").mkdir()  # not a name the manager writes: left alone
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        manager = _manager(tmp_path)
    with manager:
        assert not leftover.exists()
        assert "step-00000003" in caplog.text and "incomplete" in caplog.text
        assert (tmp_path / "notes.txt").exists() and (tmp_path / "step-3").is_dir()
        assert manager.latest_step() == 2


def test_restore_after_crash_picks_newest_committed(tmp_path: Path, writes: dict[str, Any]) -> None:
    with _manager(tmp_path, keep_last=None) as manager:
        _save_steps(manager, range(1, 3))
    (tmp_path / "step-00000003").mkdir()  # a newer save that never committed
    (tmp_path / "step-00000003" / "0123abcd-r0-0.data").write_bytes(b"partial")
    _age(tmp_path / "step-00000003")
    # a manager on the same root is writing step 4 right now: that directory stays
    writes["hold"]["step-00000004"] = release = threading.Event()
    writes["reached"]["step-00000004"] = writing = threading.Event()
    writer = _manager(tmp_path, keep_last=None)
    writer.save(4, _state(4.0))
    assert writing.wait(120), "the save of step 4 never began writing"
    with _manager(tmp_path) as manager:
        assert (tmp_path / "step-00000004").is_dir()
        assert not (tmp_path / "step-00000003").exists()
        assert manager.steps() == [1, 2]
        restored = _state()
        assert manager.restore(restored) == 2
        assert torch.equal(restored["w"], torch.full((64,), 2.0))
        assert restored["step"] == 2
    release.set()
    writer.close()
    assert writer.steps() == [1, 2, 4]


def test_restore_without_checkpoint(tmp_path: Path) -> None:
    with _manager(tmp_path / "empty") as manager:
        assert manager.latest_step() is None and manager.steps() == []
        with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
            manager.restore(_state())


# -------------------------------------------------------------------- storage, executors


def test_fsspec_root(caplog: pytest.LogCaptureFixture) -> None:
    import fsspec

    root = "memory://manager-test"
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/manager-test/step-00000099/x.data", b"partial")
    fs.store["/manager-test/step-00000099/x.data"].created -= datetime.timedelta(hours=1)
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        manager = _manager(root, keep_last=2, save_every=1)
    with manager:
        assert "removed incomplete checkpoint memory://manager-test/step-00000099" in caplog.text
        assert not fs.exists("/manager-test/step-00000099/x.data")
        for step in range(1, 5):
            manager.maybe_save(step, _state(float(step)))
        manager.wait()
        assert manager.steps() == [3, 4]
        restored = _state()
        assert manager.restore(restored) == 4
        assert torch.equal(restored["w"], torch.full((64,), 4.0))
    fs.rm("/manager-test", recursive=True)


@pytest.mark.multiprocess
def test_process_executor_and_telemetry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Any] = []
    with caplog.at_level(logging.INFO, logger="async_ckpt"):
        with CheckpointManager(tmp_path, keep_last=1, save_every=1, on_saved=seen.append) as mgr:
            for step in range(1, 4):
                future = mgr.maybe_save(step, _state(float(step)))
                assert future.stats.stall_s > 0
            mgr.wait()
            assert mgr.steps() == [3]
    assert [Path(s.checkpoint_id).name for s in seen] == [
        "step-00000001",
        "step-00000002",
        "step-00000003",
    ]
    assert caplog.text.count("saved ") >= 3


def test_given_checkpointer_is_not_closed(tmp_path: Path) -> None:
    checkpointer = async_ckpt.AsyncCheckpointer(executor="thread")
    with pytest.raises(CheckpointError, match="not both"):
        CheckpointManager(tmp_path, checkpointer=checkpointer, timeout=3)
    with CheckpointManager(tmp_path, checkpointer=checkpointer) as manager:
        manager.save(1, _state())
    checkpointer.save(_state(), checkpoint_id=tmp_path / "other").result()
    checkpointer.close()


def test_closed_manager_refuses_saves(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    manager.close()
    manager.close()
    with pytest.raises(CheckpointError, match="closed"):
        manager.save(1, _state())
