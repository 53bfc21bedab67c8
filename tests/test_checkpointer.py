"""AsyncCheckpointer.start(state) pre-warms the worker and the staging memory."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

import async_ckpt as ac


def test_start_with_state_allocates_arenas_before_the_first_save(tmp_path):
    state = {"w": torch.randn(256, 256), "b": torch.randn(256), "step": 1}
    with ac.AsyncCheckpointer(executor="thread") as ckpt:
        ckpt.start(state)
        assert ckpt.stager.arenas_allocated == 1
        generation = ckpt.stager.generation
        ckpt.save(state, checkpoint_id=tmp_path / "a").result()
        assert ckpt.stager.arenas_allocated == 1, "the first save must reuse the reserved arena"
        assert ckpt.stager.generation == generation
    target = {"w": torch.zeros(256, 256), "b": torch.zeros(256), "step": 0}
    ac.load(target, checkpoint_id=tmp_path / "a")
    assert torch.equal(target["w"], state["w"]) and target["step"] == 1


def test_cancel_marks_the_future_cancelled_and_commits_nothing(tmp_path, gate):
    from faulty_storage import StopAtWriter

    with ac.AsyncCheckpointer(executor="thread") as ckpt:
        # Its write waits for the gate: the save cannot finish before the cancel.
        held = StopAtWriter(tmp_path / "c", gate=gate, point="before-write")
        fut = ckpt.save({"w": torch.ones(8)}, storage_writer=held)
        assert fut.cancel()
        assert fut.cancelled() and fut.done()
        with pytest.raises(concurrent.futures.CancelledError):
            fut.result(timeout=120)
        (gate / "release").touch()  # the cancelled write may go on; it must not commit
        ckpt.save({"w": torch.ones(8)}, checkpoint_id=tmp_path / "next").result(timeout=120)
    with pytest.raises((ac.IncompleteCheckpointError, ac.CheckpointNotFoundError)):
        ac.load({"w": torch.zeros(8)}, checkpoint_id=tmp_path / "c")


def test_if_busy_raise_counts_free_buffers_not_the_option(tmp_path, gate):
    from faulty_storage import StopAtWriter

    def held(name):  # its write waits for the gate, so its buffer stays in use till then
        return StopAtWriter(tmp_path / name, gate=gate, point="before-write")

    stager = ac.Stager(num_buffers=2)
    with ac.AsyncCheckpointer(executor="thread", stager=stager, if_busy="raise") as ckpt:
        first = ckpt.save({"w": torch.ones(8)}, storage_writer=held("a"))
        second = ckpt.save({"w": torch.ones(8)}, storage_writer=held("b"))
        with pytest.raises(ac.SaveInProgressError):
            ckpt.save({"w": torch.ones(8)}, checkpoint_id=tmp_path / "c")
        (gate / "release").touch()
        first.result(timeout=120)
        second.result(timeout=120)
    stager.close()


def test_executors_are_chosen_by_name_from_the_registry():
    from async_ckpt.executor.registry import EXECUTORS

    assert set(EXECUTORS) == {"process", "thread"}
    with pytest.raises(ac.CheckpointError, match="must be 'process' or 'thread', not 'fiber'"):
        ac.AsyncCheckpointer(executor="fiber")  # type: ignore[arg-type]


def test_the_process_executor_refuses_a_process_local_writer_before_any_worker_starts(memory_url):
    with ac.AsyncCheckpointer(executor="process") as ckpt:
        with pytest.raises(ac.CheckpointError, match="executor='thread'"):
            ckpt.save({"w": torch.ones(2)}, checkpoint_id=f"{memory_url}/refused")
        assert ckpt.worker_pid is None
