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


def test_cancel_marks_the_future_cancelled_and_commits_nothing(tmp_path):
    from faulty_storage import SlowWriter

    with ac.AsyncCheckpointer(executor="thread") as ckpt:
        fut = ckpt.save(
            {"w": torch.ones(8)}, storage_writer=SlowWriter(tmp_path / "c", delay_s=1.0)
        )
        assert fut.cancel()
        assert fut.cancelled() and fut.done()
        with pytest.raises(concurrent.futures.CancelledError):
            fut.result(timeout=10)
        ckpt.save({"w": torch.ones(8)}, checkpoint_id=tmp_path / "next").result(timeout=30)
    with pytest.raises((ac.IncompleteCheckpointError, ac.CheckpointNotFoundError)):
        ac.load({"w": torch.zeros(8)}, checkpoint_id=tmp_path / "c")


def test_if_busy_raise_counts_free_buffers_not_the_option(tmp_path):
    from faulty_storage import SlowWriter

    stager = ac.Stager(num_buffers=2)
    with ac.AsyncCheckpointer(executor="thread", stager=stager, if_busy="raise") as ckpt:
        first = ckpt.save(
            {"w": torch.ones(8)}, storage_writer=SlowWriter(tmp_path / "a", delay_s=1.5)
        )
        second = ckpt.save(
            {"w": torch.ones(8)}, storage_writer=SlowWriter(tmp_path / "b", delay_s=1.5)
        )
        with pytest.raises(ac.SaveInProgressError):
            ckpt.save({"w": torch.ones(8)}, checkpoint_id=tmp_path / "c")
        first.result(timeout=30)
        second.result(timeout=30)
    stager.close()
