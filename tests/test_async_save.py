"""AsyncCheckpointer and async_save: snapshots under training, futures, timeouts, if_busy."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import CancelledError

import pytest
import torch
from faulty_storage import StopAtWriter, wait_reached
from torch import nn

import async_ckpt
from async_ckpt import (
    AsyncCheckpointer,
    FileSystemWriter,
    IncompleteCheckpointError,
    Metadata,
    SaveFuture,
    SaveInProgressError,
    SaveTimeoutError,
    StagerOptions,
)

PROCESS = pytest.param("process", marks=pytest.mark.multiprocess)


def writer(path) -> FileSystemWriter:
    return FileSystemWriter(path, sync_files=False)  # durability is not what these test


def held_writer(path, gate) -> StopAtWriter:
    """Holds the save's first data-file write until the test releases ``gate``."""
    return StopAtWriter(path, gate=gate, point="before-write")


def zeros_like_state(state):
    """A structure-equal copy of ``state`` with every tensor zeroed, to load into."""
    out = copy.deepcopy(state)

    def zero(node):
        if isinstance(node, torch.Tensor):
            node.zero_()
        elif isinstance(node, dict):
            for v in node.values():
                zero(v)
        elif isinstance(node, list):
            for v in node:
                zero(v)

    zero(out)
    return out


def assert_same(got, want, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}.{i}")
    else:
        assert got == want, where


@pytest.mark.parametrize("executor", [PROCESS, "thread"])
def test_training_loop_checkpoints_are_snapshots(tmp_path, executor, request):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.randn(32, 64)
    state = {"model": model, "optim": optim, "step": 0}
    ck = (
        request.getfixturevalue("ckpt")
        if executor == "process"
        else AsyncCheckpointer(executor="thread")
    )
    expected, futures = [], []
    try:
        for step in range(6):
            model(data).square().mean().backward()
            optim.step()
            optim.zero_grad()
            state["step"] = step
            expected.append(
                copy.deepcopy(
                    {"model": model.state_dict(), "optim": optim.state_dict(), "step": step}
                )
            )
            futures.append(ck.save(state, storage_writer=writer(tmp_path / f"s{step}")))
            # In-place updates right after save returns: the snapshot must not see them.
            model(data).square().mean().backward()
            optim.step()
            optim.zero_grad()
        for fut in futures:
            assert isinstance(fut.result(timeout=120), Metadata)
    finally:
        if executor == "thread":
            ck.close()
    for step, want in enumerate(expected):
        got = zeros_like_state(want)
        async_ckpt.load(got, checkpoint_id=tmp_path / f"s{step}")
        assert_same(got, want, f"step {step}")


@pytest.mark.multiprocess
@pytest.mark.asyncio
async def test_futures_await_and_report(ckpt, tmp_path, gate):
    state = {"w": torch.randn(256, 256), "note": "hello"}
    fut = ckpt.save(state, storage_writer=writer(tmp_path / "a"))
    assert isinstance(fut, SaveFuture)
    await fut.staged
    meta = await fut
    assert isinstance(meta, Metadata)
    assert fut.result() is meta
    assert fut.done() and fut.exception() is None and not fut.cancelled()

    called = []
    fut.add_done_callback(called.append)  # already done: runs at once
    assert called == [fut]

    stats = fut.stats
    assert stats.bytes >= 256 * 256 * 4
    assert stats.copied_bytes == 256 * 256 * 4
    assert stats.total_s > 0 and stats.stall_s > 0 and stats.staged_s > 0
    assert stats.total_s >= stats.stall_s
    assert str(tmp_path / "a") in stats.line()

    # A callback registered while the write is held runs once it commits.
    fut = ckpt.save(state, storage_writer=held_writer(tmp_path / "b", gate))
    later = []
    fut.add_done_callback(later.append)
    await fut.staged
    assert not fut.done() and later == []
    (gate / "release").touch()
    assert isinstance(await fut, Metadata)
    assert later == [fut]


def test_async_staging_future_resolves_then_state_may_change(tmp_path):
    sd = {"w": torch.arange(2_000_000, dtype=torch.float32)}
    want = sd["w"].clone()
    stager = async_ckpt.Stager(StagerOptions(async_staging=True))
    with AsyncCheckpointer(executor="thread", stager=stager) as ck:
        fut = ck.save(sd, storage_writer=writer(tmp_path / "c"))
        fut.staged.result(timeout=60)
        sd["w"].mul_(-1)
        fut.result(timeout=60)
    stager.close()
    got = {"w": torch.zeros_like(want)}
    async_ckpt.load(got, checkpoint_id=tmp_path / "c")
    assert torch.equal(got["w"], want)


@pytest.mark.parametrize("executor", [PROCESS, "thread"])
def test_timeout_stops_the_save_before_it_commits(tmp_path, gate, executor):
    target = tmp_path / "slow"
    # Made up front, so "nothing committed" reads the same whether or not the
    # worker got as far as creating it.
    target.mkdir()
    with AsyncCheckpointer(executor=executor) as ck:
        # A first save has the worker up, so the timeout hits the write itself.
        ck.save({"w": torch.ones(10)}, storage_writer=writer(tmp_path / "ok")).result(120)
        fut = ck.save(
            {"w": torch.ones(1000)}, storage_writer=held_writer(target, gate), timeout=0.5
        )
        with pytest.raises(SaveTimeoutError, match="did not commit within 0.5 s"):
            fut.result(timeout=60)
        (gate / "release").touch()  # a thread executor's write goes on; it must not commit
        if executor == "thread":  # (the process executor's next save: test_worker.py)
            ck.save({"w": torch.zeros(3)}, storage_writer=writer(tmp_path / "after")).result(60)
    with pytest.raises(IncompleteCheckpointError):
        async_ckpt.load({"w": torch.zeros(1000)}, checkpoint_id=target)


@pytest.mark.parametrize("executor", [PROCESS, "thread"])
def test_cancel_commits_nothing(tmp_path, gate, executor):
    target = tmp_path / "cancelled"
    with AsyncCheckpointer(executor=executor) as ck:
        fut = ck.save({"w": torch.ones(1000)}, storage_writer=held_writer(target, gate))
        wait_reached(gate, "before-write")
        assert fut.cancel() is True
        with pytest.raises(CancelledError):
            fut.result(timeout=60)
        assert fut.cancel() is False  # already finished
        (gate / "release").touch()
    with pytest.raises(IncompleteCheckpointError):
        async_ckpt.load({"w": torch.zeros(1000)}, checkpoint_id=target)


@pytest.mark.parametrize("executor", [PROCESS, "thread"])
def test_cancel_while_staging_commits_nothing(tmp_path, gate, executor):
    # async staging: cancelled (most likely) before the snapshot reached the executor;
    # the write is held all the same, so however slow this thread is the save cannot
    # have committed before the cancel.
    sd = {f"w{i}": torch.randn(1 << 20) for i in range(16)}  # 64 MiB
    stager = async_ckpt.Stager(StagerOptions(async_staging=True))
    with AsyncCheckpointer(executor=executor, stager=stager) as ck:
        fut = ck.save(sd, storage_writer=held_writer(tmp_path / "x", gate))
        assert fut.cancel() is True
        with pytest.raises(CancelledError):
            fut.result(timeout=120)
        (gate / "release").touch()  # a write that got as far as the gate goes on; no commit
        ck.save(sd, storage_writer=writer(tmp_path / "y")).result(timeout=120)
    stager.close()
    assert not (tmp_path / "x" / "metadata.json").exists()
    assert (tmp_path / "y" / "metadata.json").exists()


@pytest.mark.multiprocess
def test_if_busy_raise_refuses_while_a_save_runs(ckpt, tmp_path, gate):
    ckpt.if_busy = "raise"
    try:
        slow = ckpt.save({"w": torch.ones(100)}, storage_writer=held_writer(tmp_path / "a", gate))
        with pytest.raises(SaveInProgressError, match="still running"):
            ckpt.save({"w": torch.ones(100)}, storage_writer=writer(tmp_path / "b"))
        (gate / "release").touch()
        slow.result(timeout=120)
        ckpt.save({"w": torch.ones(100)}, storage_writer=writer(tmp_path / "b")).result(120)
    finally:
        ckpt.if_busy = "wait"


@pytest.mark.multiprocess
def test_if_busy_wait_queues_behind_a_running_save(ckpt, tmp_path, gate):
    first_state = {"w": torch.full((100,), 1.0)}
    first = ckpt.save(first_state, storage_writer=held_writer(tmp_path / "a", gate))
    wait_reached(gate, "before-write")
    first_state["w"].fill_(9.0)
    # The second save waits for the first one's buffer, so the gate opens from a thread.
    opener = threading.Thread(target=lambda: (gate / "release").touch())
    opener.start()
    second = ckpt.save({"w": torch.full((100,), 2.0)}, storage_writer=writer(tmp_path / "b"))
    opener.join()
    first.result(timeout=120)
    second.result(timeout=120)
    for name, value in (("a", 1.0), ("b", 2.0)):
        got = {"w": torch.zeros(100)}
        async_ckpt.load(got, checkpoint_id=tmp_path / name)
        assert torch.equal(got["w"], torch.full((100,), value)), name


@pytest.mark.multiprocess
def test_async_save_function_returns_a_future(tmp_path):
    from async_ckpt import api as checkpointer

    sd = {"w": torch.arange(10.0), "epoch": 3}
    try:
        fut = async_ckpt.async_save(sd, checkpoint_id=tmp_path / "f")
        assert isinstance(fut, SaveFuture)
        fut.result(timeout=120)
        again = async_ckpt.async_save(sd, checkpoint_id=tmp_path / "g")
        again.result(timeout=120)
        shared = list(checkpointer._DEFAULT.values())
    finally:
        async_ckpt.close_async_saves()
    assert not checkpointer._DEFAULT and all(ck._closed for ck in shared)
    got = {"w": torch.zeros(10), "epoch": 0}
    async_ckpt.load(got, checkpoint_id=tmp_path / "g")
    assert torch.equal(got["w"], torch.arange(10.0)) and got["epoch"] == 3
