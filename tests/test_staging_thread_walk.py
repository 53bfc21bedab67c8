"""With async staging, saves after the first walk the state on the staging thread.

Only the Stateful objects' ``state_dict()`` calls stay on the caller's thread
(they may run collectives); what the walk finds wrong fails the future; a
cancel or a timeout that comes before the hand-off commits nothing.
"""

from __future__ import annotations

import concurrent.futures
import threading

import pytest
import torch

import async_ckpt
from async_ckpt import AsyncCheckpointer, Stager
from async_ckpt.errors import SaveTimeoutError, StateDictError
from async_ckpt.executor import checkpointer as checkpointer_module
from async_ckpt.tools.verify import verify_checkpoint


class Recorder:
    """A Stateful object that records the thread and order of its state_dict() calls."""

    calls: list[tuple[str, str]] = []

    def __init__(self, name: str, value: torch.Tensor) -> None:
        self.name, self.value = name, value

    def state_dict(self):
        Recorder.calls.append((self.name, threading.current_thread().name))
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value.copy_(state["value"])


@pytest.fixture
def walks(monkeypatch):
    """The name of the thread of each flatten the checkpointer runs."""
    threads: list[str] = []
    real = checkpointer_module.flatten

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpointer_module, "flatten", recording)
    Recorder.calls = []
    return threads


def _checkpointer(executor: str = "thread") -> AsyncCheckpointer:
    return AsyncCheckpointer(executor=executor, no_dist=True, stager=Stager(async_staging=True))


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_later_saves_walk_on_the_staging_thread_and_stage_the_right_bytes(
    tmp_path, walks, executor
):
    torch.manual_seed(0)
    plain = {f"t{i}": torch.randn(5) for i in range(50)}
    b, a = Recorder("b", torch.randn(3)), Recorder("a", torch.randn(4))
    caller = threading.current_thread().name

    def state():
        return {"plain": plain, "b": b, "a": a, "nested": {"step": 3, "lr": 0.5}}

    with _checkpointer(executor) as ckpt:
        for i in range(3):
            with torch.no_grad():
                for t in plain.values():
                    t.add_(1.0)
            fut = ckpt.save(state(), checkpoint_id=tmp_path / f"s{i}")
            fut.staged.result(timeout=60)
            fut.result(timeout=60)
    assert walks[0] == caller  # the first save: on the caller's thread
    assert walks[1:] == ["async_ckpt-stage", "async_ckpt-stage"]
    # state_dict() always on the caller's thread, in key order, once per save
    assert Recorder.calls == [("a", caller), ("b", caller)] * 3
    target = {
        "plain": {k: torch.zeros(5) for k in plain},
        "b": Recorder("b", torch.zeros(3)),
        "a": Recorder("a", torch.zeros(4)),
        "nested": {"step": 0, "lr": 0.0},
    }
    async_ckpt.load(target, checkpoint_id=tmp_path / "s2")
    for key, value in plain.items():
        assert torch.equal(target["plain"][key], value)
    assert torch.equal(target["a"].value, a.value) and torch.equal(target["b"].value, b.value)
    assert target["nested"] == {"step": 3, "lr": 0.5}


def test_a_bad_state_found_by_the_background_walk_fails_the_future(tmp_path, walks):
    good = {"w": torch.randn(4)}
    with _checkpointer() as ckpt:
        ckpt.save(good, checkpoint_id=tmp_path / "a").result(timeout=60)
        fut = ckpt.save({"w": torch.randn(4), 3.5: torch.zeros(1)}, checkpoint_id=tmp_path / "b")
        with pytest.raises(StateDictError, match="must be str or int"):
            fut.staged.result(timeout=60)
        with pytest.raises(StateDictError):
            fut.result(timeout=60)
        # After a failed walk the next save walks on the caller's thread again: a bad
        # state raises at the call, a good one saves.
        with pytest.raises(StateDictError):
            ckpt.save({2.5: torch.zeros(1)}, checkpoint_id=tmp_path / "c")
        ckpt.save(good, checkpoint_id=tmp_path / "d").result(timeout=60)
    assert not (tmp_path / "b" / "metadata.json").exists()
    loaded = {"w": torch.zeros(4)}
    async_ckpt.load(loaded, checkpoint_id=tmp_path / "d")
    assert torch.equal(loaded["w"], good["w"])


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_stopped_before_the_hand_off_commits_nothing(tmp_path, walks, how):
    state = {"w": torch.randn(8)}
    gate = threading.Event()
    with _checkpointer() as ckpt:
        ckpt.save(state, checkpoint_id=tmp_path / "first").result(timeout=60)
        ckpt.stager.in_staging_thread(lambda: gate.wait(60))  # holds the staging thread
        if how == "cancel":
            fut = ckpt.save(state, checkpoint_id=tmp_path / "stopped")
            assert fut.cancel()
            assert fut.cancelled()
            with pytest.raises(concurrent.futures.CancelledError):
                fut.staged.result(timeout=60)
        else:
            fut = ckpt.save(state, checkpoint_id=tmp_path / "stopped", timeout=0.05)
            assert isinstance(fut.exception(timeout=60), SaveTimeoutError)
        gate.set()
        # The staging thread skips the stopped save; the next one saves normally.
        ckpt.save(state, checkpoint_id=tmp_path / "after").result(timeout=60)
    assert not (tmp_path / "stopped").exists()
    assert verify_checkpoint(tmp_path / "after").ok
    assert walks.count("async_ckpt-stage") == 1  # the stopped save was never walked


def test_two_saves_in_flight_keep_their_order(tmp_path, walks):
    """A second save queued behind the first (if_busy='wait') is walked and written after
    it, each with its own values."""
    first, second = {"w": torch.full((6,), 1.0)}, {"w": torch.full((6,), 2.0)}
    with _checkpointer() as ckpt:
        ckpt.save(first, checkpoint_id=tmp_path / "warm").result(timeout=60)
        f1 = ckpt.save(first, checkpoint_id=tmp_path / "one")
        f2 = ckpt.save(second, checkpoint_id=tmp_path / "two")
        f1.result(timeout=60)
        f2.result(timeout=60)
    for name, expected in (("one", 1.0), ("two", 2.0)):
        loaded = {"w": torch.zeros(6)}
        async_ckpt.load(loaded, checkpoint_id=tmp_path / name)
        assert torch.equal(loaded["w"], torch.full((6,), expected))


def test_a_cancel_between_layout_and_hand_off_frees_the_buffer(tmp_path, walks):
    """The staging thread laid the save out (holding a buffer) when the cancel came: the
    save is dropped there, its buffer goes back and the next save is not stuck."""
    state = {"w": torch.randn(8)}
    entered, gate = threading.Event(), threading.Event()
    with _checkpointer() as ckpt:
        ckpt.save(state, checkpoint_id=tmp_path / "first").result(timeout=60)
        real = ckpt._chain_staged

        def held(*args):
            entered.set()
            gate.wait(60)
            real(*args)

        ckpt._chain_staged = held  # runs on the staging thread after begin(), before hand-off
        fut = ckpt.save(state, checkpoint_id=tmp_path / "stopped")
        assert entered.wait(60)
        assert fut.cancel()
        gate.set()
        ckpt._chain_staged = real
        ckpt.save(state, checkpoint_id=tmp_path / "after").result(timeout=60)
    assert fut.cancelled()
    assert not (tmp_path / "stopped").exists()
    assert verify_checkpoint(tmp_path / "after").ok


def test_a_save_after_a_failed_walk_queues_behind_saves_still_waiting(tmp_path, walks):
    """Save n fails on the staging thread while save n+1 still waits there: save n+2 must
    queue behind n+1, not stage on the caller's thread ahead of it (n+1 would then wait
    for n+2's buffer, and n+2's copy for n+1: a deadlock)."""
    good = {"w": torch.randn(4)}
    first_gate, second_gate = threading.Event(), threading.Event()
    with _checkpointer() as ckpt:
        ckpt.save(good, checkpoint_id=tmp_path / "first").result(timeout=60)
        ckpt.stager.in_staging_thread(lambda: first_gate.wait(60))
        bad = ckpt.save({"w": torch.randn(4), 1.5: torch.zeros(1)}, checkpoint_id=tmp_path / "n")
        ckpt.stager.in_staging_thread(lambda: second_gate.wait(60))
        queued = ckpt.save(good, checkpoint_id=tmp_path / "n1")
        first_gate.set()
        assert isinstance(bad.exception(timeout=60), StateDictError)
        after = ckpt.save(good, checkpoint_id=tmp_path / "n2")  # n1 is still queued
        second_gate.set()
        queued.result(timeout=60)
        after.result(timeout=60)
    for name in ("n1", "n2"):
        assert verify_checkpoint(tmp_path / name).ok
