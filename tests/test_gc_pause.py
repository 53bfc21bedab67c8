"""The collector is paused during a walk and the caller's setting comes back after."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from async_ckpt import AsyncCheckpointer
from async_ckpt.gc_pause import gc_paused


@pytest.fixture(autouse=True)
def _collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_paused_inside_and_restored_after():
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # re-entrant
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_caller_that_disabled_the_collector_keeps_it_disabled():
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_restored_after_an_error():
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_overlapping_walks_in_two_threads_restore_once_both_end():
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with gc_paused():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with gc_paused():
            second_in.set()
            first_out.wait(10)
            seen["after_first_left"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"after_first_left": False}  # still paused: the second walk is running
    assert gc.isenabled()


@pytest.mark.parametrize("async_staging", [False, True])
def test_saves_leave_the_collector_as_they_found_it(tmp_path, async_staging):
    from async_ckpt import Stager

    state = {f"t{i}": torch.randn(8) for i in range(200)}
    with AsyncCheckpointer(
        executor="thread", no_dist=True, stager=Stager(async_staging=async_staging)
    ) as checkpointer:
        checkpointer.save(state, checkpoint_id=tmp_path / "a").result()
        assert gc.isenabled()
        gc.disable()
        checkpointer.save(state, checkpoint_id=tmp_path / "b").result()
        assert not gc.isenabled()
        gc.enable()
