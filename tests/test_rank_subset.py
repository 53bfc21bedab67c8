"""A checkpoint call made on only some ranks of a group fails, bounded, naming the others.

Without the arrival check these calls wait in a collective until the group's
timeout (30 minutes by default), silently. ``ASYNC_CKPT_ARRIVAL_TIMEOUT_S``
is set low here: the error is the expected outcome, so the test waits that
long by design (it bounds the wait, it does not synchronise anything).
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_ranks

import async_ckpt as ac

pytestmark = pytest.mark.multiprocess

ARRIVAL_S = "2"


def _call(how: str, root: str, **kw) -> None:
    state = {"w": torch.ones(3)}
    if how == "save":
        ac.save(state, checkpoint_id=root, **kw)
    elif how == "async_save":
        ac.async_save(state, checkpoint_id=root, **kw).result()
    elif how == "thread":
        ac.async_save(state, checkpoint_id=root, executor="thread", **kw).result()
    elif how == "load":
        ac.load(state, checkpoint_id=root, **kw)
    elif how == "manager":
        from async_ckpt.manager import CheckpointManager

        with CheckpointManager(root, save_every=1, **kw) as manager:
            manager.save(1, state).result()


def _only_rank0_calls(rank, world_size, root, how):
    os.environ["ASYNC_CKPT_ARRIVAL_TIMEOUT_S"] = ARRIVAL_S
    if rank != 0:
        return None
    if how == "load":
        ac.save({"w": torch.zeros(3)}, checkpoint_id=root, no_dist=True)
    try:
        _call(how, root)
    except ac.RanksMissingError as exc:
        error = (exc.missing, str(exc))
    else:
        error = None
    # the way out the message points to works, on this rank alone
    _call(how, root + "-alone" if how != "load" else root, no_dist=True)
    ac.close_async_saves()
    return error


@pytest.mark.parametrize("how", ["save", "async_save", "thread", "load", "manager"])
def test_a_call_on_rank_0_alone_fails_naming_the_missing_rank(tmp_path, how):
    error, _ = run_ranks(_only_rank0_calls, 2, str(tmp_path / "c"), how)
    assert error is not None, f"{how} on rank 0 alone did not fail"
    missing, message = error
    assert missing == [1]
    assert "rank(s) [1] of 2 did not call it" in message and "no_dist=True" in message


def _all_ranks_call(rank, world_size, root):
    os.environ["ASYNC_CKPT_ARRIVAL_TIMEOUT_S"] = ARRIVAL_S
    for n in range(3):  # calls are numbered: repeated calls keep meeting under one key
        ac.save({"w": torch.full((4,), float(n))}, checkpoint_id=f"{root}/{n}")
        target = {"w": torch.zeros(4)}
        ac.load(target, checkpoint_id=f"{root}/{n}")
        assert torch.equal(target["w"], torch.full((4,), float(n)))
    return True


def test_calls_on_every_rank_pass_the_check(tmp_path):
    assert run_ranks(_all_ranks_call, 2, str(tmp_path)) == [True, True]


def test_a_bad_arrival_timeout_is_refused(monkeypatch):
    from async_ckpt.dist.arrival import arrival_timeout

    monkeypatch.setenv("ASYNC_CKPT_ARRIVAL_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="positive number of seconds"):
        arrival_timeout()


def _second_save_on_rank0_only(rank, world_size, root, executor):
    os.environ["ASYNC_CKPT_ARRIVAL_TIMEOUT_S"] = ARRIVAL_S
    with ac.AsyncCheckpointer(executor=executor) as ckpt:
        ckpt.save({"w": torch.ones(3)}, checkpoint_id=f"{root}/a").result()
        if rank != 0:
            return None
        future = ckpt.save({"w": torch.ones(3)}, checkpoint_id=f"{root}/b")
        try:
            future.result(timeout=120)
        except ac.RanksMissingError as exc:
            return exc.missing, str(exc)
        except Exception as exc:  # the wrong error, reported to the test
            return type(exc).__name__, str(exc)
    return "committed"


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_a_later_save_on_rank_0_alone_fails_its_future_naming_the_rank(tmp_path, executor):
    result, _ = run_ranks(_second_save_on_rank0_only, 2, str(tmp_path), executor)
    assert result[0] == [1], result
    assert "rank(s) [1] of 2 did not call it" in result[1]
    assert not (tmp_path / "b" / "metadata.json").exists()
