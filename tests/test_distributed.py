"""Multi-rank saves and loads: gloo ranks on loopback, DTensor shards, resharding."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks

import async_ckpt as ac

pytestmark = pytest.mark.multiprocess

FULL = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)


def _mesh(world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size,))


def _state(world_size: int, placement: str = "shard0"):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh(world_size)
    place = {"shard0": Shard(0), "shard1": Shard(1), "rep": Replicate()}[placement]
    return {
        "model": {
            "sharded": distribute_tensor(FULL.clone(), mesh, [place]),
            "replicated": distribute_tensor(FULL * 2, mesh, [Replicate()]),
        },
        "plain": torch.full((5,), 7.0),
        "meta": {"step": 3, "name": "run-1"},
    }


def _zeros_like_state(world_size: int, placement: str):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh(world_size)
    place = {"shard0": Shard(0), "shard1": Shard(1), "rep": Replicate()}[placement]
    return {
        "model": {
            "sharded": distribute_tensor(torch.zeros(64, 8), mesh, [place]),
            "replicated": torch.zeros(64, 8),
        },
        "plain": torch.zeros(5),
        "meta": {"step": 0, "name": ""},
    }


def _save_body(rank, world_size, root, executor, placement):
    sd = _state(world_size, placement)
    with ac.AsyncCheckpointer(executor=executor) as ckpt:
        first = ckpt.save(sd, checkpoint_id=f"{root}/a")
        first.result()
        second = ckpt.save(sd, checkpoint_id=f"{root}/b")
        meta = second.result()
    return {
        "files": sorted(meta.files),
        "sizes": meta.files,
        "first_reused": first.stats.plan_reused,
        "second_reused": second.stats.plan_reused,
        "written": second.stats.bytes,
    }


def _load_body(rank, world_size, root, placement):
    target = _zeros_like_state(world_size, placement)
    ac.load(target, checkpoint_id=f"{root}/b")
    assert torch.equal(target["model"]["sharded"].full_tensor(), FULL)
    assert torch.equal(target["model"]["replicated"], FULL * 2)
    assert torch.equal(target["plain"], torch.full((5,), 7.0))
    assert target["meta"] == {"step": 3, "name": "run-1"}
    return True


def _check_single_process_load(root):
    target = {
        "model": {"sharded": torch.zeros(64, 8), "replicated": torch.zeros(64, 8)},
        "plain": torch.zeros(5),
        "meta": {"step": 0, "name": ""},
    }
    ac.load(target, checkpoint_id=f"{root}/b", no_dist=True)
    assert torch.equal(target["model"]["sharded"], FULL)
    assert torch.equal(target["model"]["replicated"], FULL * 2)


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_two_ranks_save_dedups_and_caches_plan(tmp_path, executor):
    results = run_ranks(_save_body, 2, str(tmp_path), executor, "shard0")
    assert results[0]["files"] == results[1]["files"]
    # every rank wrote something: the replicated tensor and the plain one went to different ranks
    ranks = {name.split("-r")[1].split("-")[0] for name in results[0]["files"]}
    assert ranks == {"0", "1"}
    total = sum(results[0]["sizes"].values())
    expected = FULL.numel() * 4 + FULL.numel() * 4 + 5 * 4 + len("run-1") * 0
    assert total == expected, "replicated tensors must be stored once"
    assert not results[0]["first_reused"]
    assert results[0]["second_reused"] and results[1]["second_reused"]
    run_ranks(_load_body, 2, str(tmp_path), "shard0")
    _check_single_process_load(tmp_path)


@pytest.mark.parametrize(
    ("save_ranks", "save_place", "load_ranks", "load_place"),
    [(2, "shard0", 4, "shard1"), (4, "shard0", 2, "shard0"), (2, "shard0", 2, "shard1")],
)
def test_reshard(tmp_path, save_ranks, save_place, load_ranks, load_place):
    run_ranks(_save_body, save_ranks, str(tmp_path), "process", save_place)
    assert run_ranks(_load_body, load_ranks, str(tmp_path), load_place) == [True] * load_ranks
    _check_single_process_load(tmp_path)


def _mismatch_body(rank, world_size, root, executor):
    sd = {"w": torch.ones(3), ("abc" if rank == 0 else "def"): torch.rand(1)}
    # group_timeout only bounds the wait for a peer that never comes: both ranks save
    with ac.AsyncCheckpointer(executor=executor, group_timeout=120) as ckpt:
        fut = ckpt.save(sd, checkpoint_id=f"{root}/bad")
        with pytest.raises(ac.RankMismatchError) as info:
            fut.result(timeout=120)
    return str(info.value)


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_key_mismatch_fails_every_rank_with_diff(tmp_path, executor):
    messages = run_ranks(_mismatch_body, 2, str(tmp_path), executor)
    for msg in messages:
        assert "rank 0 has keys other ranks lack: ['abc']" in msg
        assert "rank 1 has keys other ranks lack: ['def']" in msg
    with pytest.raises((ac.IncompleteCheckpointError, ac.CheckpointNotFoundError)):
        ac.load({"w": torch.zeros(3)}, checkpoint_id=f"{tmp_path}/bad", strict=False)


class _Module(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net1 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
        self.net2 = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU())
        self.net3 = torch.nn.Linear(32, 64)
        self.net4 = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(64, 8))


def _assert_same_keys_body(rank, world_size):
    # Ported from PyTorch's test_save_load_api.py::test_assert_same_keys.
    state_dict = _Module().state_dict()
    ac.assert_same_keys(state_dict)
    if rank == 0:
        state_dict["abc"] = torch.rand(1)
    else:
        state_dict["def"] = torch.rand(1)
    try:
        ac.assert_same_keys(state_dict)
    except AssertionError as exc:
        return str(exc)
    return None


def test_assert_same_keys(tmp_path):
    messages = run_ranks(_assert_same_keys_body, 2)
    assert all(m is not None and "['abc']" in m and "['def']" in m for m in messages)


def test_assert_same_keys_single_process_is_quiet():
    ac.assert_same_keys({"anything": torch.ones(1)})


def _failing_rank_body(rank, world_size, root):
    from faulty_storage import FailingWriter, tests_on_worker_path

    tests_on_worker_path()
    sd = (
        {"w": torch.ones(1000) * rank, f"own{rank}": torch.ones(10)}
        if False
        else {"w": torch.ones(1000)}
    )
    # group_timeout only bounds the wait for a peer that never comes: both ranks save
    with ac.AsyncCheckpointer(group_timeout=120) as ckpt:
        ckpt.save(sd, checkpoint_id=f"{root}/good").result()
        writer = FailingWriter(f"{root}/good", fail_ranks=(1,))
        fut = ckpt.save({"w": torch.ones(1000) * 5, "x": torch.ones(2000)}, storage_writer=writer)
        with pytest.raises(ac.SaveFailedError) as info:
            fut.result(timeout=120)
        # the next save works again, with fresh workers
        ckpt.save(sd, checkpoint_id=f"{root}/after").result(timeout=120)
    return str(info.value)


def test_one_rank_fails_nothing_committed(tmp_path):
    messages = run_ranks(_failing_rank_body, 2, str(tmp_path))
    for msg in messages:
        assert "rank 1: OSError: disk on fire (rank 1)" in msg
        assert "nothing was committed" in msg
    target = {"w": torch.zeros(1000)}
    ac.load(target, checkpoint_id=f"{tmp_path}/good", no_dist=True)
    assert torch.equal(target["w"], torch.ones(1000)), "the old checkpoint must survive"
    ac.load(target, checkpoint_id=f"{tmp_path}/after", no_dist=True)


def _dead_rank_body(rank, world_size, root):
    # the survivor waits group_timeout for its dead peer: keep it short
    with ac.AsyncCheckpointer(group_timeout=2).start() as ckpt:
        if rank == 1:
            os._exit(0)  # this rank dies before its save
        fut = ckpt.save({"w": torch.ones(10)}, checkpoint_id=f"{root}/x")
        with pytest.raises(ac.CheckpointError):
            fut.result(timeout=90)
        dist.destroy_process_group = lambda *a, **k: None  # the peer is gone
    return True


def test_dead_rank_fails_others_within_timeout(tmp_path):
    assert run_ranks(_dead_rank_body, 2, str(tmp_path), reporting=1, timeout=120)[0] is True
    with pytest.raises((ac.IncompleteCheckpointError, ac.CheckpointNotFoundError)):
        ac.load({"w": torch.zeros(10)}, checkpoint_id=f"{tmp_path}/x")


def _sync_save_body(rank, world_size, root):
    sd = _state(world_size, "shard0")
    ac.save(sd, checkpoint_id=f"{root}/b")
    return True


def test_sync_save_four_ranks(tmp_path):
    run_ranks(_sync_save_body, 4, str(tmp_path))
    run_ranks(_load_body, 4, str(tmp_path), "shard0")
