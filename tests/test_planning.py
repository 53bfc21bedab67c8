"""The global planner: one fixed-size digest collective per cached save, full exchange on change."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from async_ckpt.dist.comm import GroupComm, LocalComm
from async_ckpt.errors import RankMismatchError, SaveFailedError
from async_ckpt.planning.plan import Planner, check_same_keys
from async_ckpt.state.model import LocalState, TensorItem


def _state(n: int = 3, rank: int = 0, world: int = 1, extra: str | None = None) -> LocalState:
    """``n`` row-sharded float32 tensors; ``extra`` adds a key only this rank has."""
    items = [
        TensorItem(
            key=f"layer{i}.weight",
            path=(f"layer{i}", "weight"),
            dtype="float32",
            shape=(4 * world, 8),
            offsets=(4 * rank, 0),
            sizes=(4, 8),
        )
        for i in range(n)
    ]
    if extra is not None:
        items.append(TensorItem(extra, (extra,), "float32", (2,), (0,), (2,)))
    return LocalState(items=items)


class _PeersComm(LocalComm):
    """Rank 0 of a fake world: the other ranks' digests and objects are given up front."""

    def __init__(self, peer_states: list[LocalState]) -> None:
        super().__init__()
        self.peers = peer_states
        self.world_size = 1 + len(peer_states)
        self.objects_gathered = 0

    def all_gather_digests(self, digest: bytes) -> list[bytes]:
        self.collective_count += 1
        others = [
            bytes.fromhex(p.keys_fingerprint()) + bytes.fromhex(p.plan_fingerprint())
            for p in self.peers
        ]
        # check_same_keys sends the 16-byte key digest alone
        return [digest, *(d[: len(digest)] for d in others)]

    def all_gather_object(self, obj: Any) -> list[Any]:
        self.collective_count += 1
        self.objects_gathered += 1
        if isinstance(obj, dict):  # key summaries, for the mismatch report
            return [obj, *(p.key_summary() for p in self.peers)]
        return [obj, *([(it.chunk_id, it.nbytes) for it in p.items] for p in self.peers)]


def test_local_comm_digests() -> None:
    comm = LocalComm()
    assert comm.all_gather_digests(b"\x01" * 32) == [b"\x01" * 32]
    assert comm.collective_count == 1


def test_cached_plan_costs_one_digest_collective() -> None:
    state = _state()
    comm, planner = LocalComm(), Planner()
    first = planner.plan(state, comm)
    assert planner.full_plans == 1
    before = comm.collective_count
    assert planner.plan(state, comm) is first
    assert comm.collective_count - before == 1
    assert planner.full_plans == 1
    planner.plan(_state(n=4), comm)  # the pieces changed: plan again
    assert planner.full_plans == 2


def test_peer_plan_change_replans_and_dedups() -> None:
    mine, peer = _state(rank=0, world=2), _state(rank=1, world=2)
    comm, planner = _PeersComm([peer]), Planner()
    plan = planner.plan(mine, comm)
    assert comm.objects_gathered == 1  # the chunk lists, once
    assert sorted(set(plan.writer_of.values())) == [0, 1]
    assert planner.plan(mine, comm) is plan
    assert comm.objects_gathered == 1, "a cached plan must not gather the chunk lists"
    comm.peers = [_state(rank=1, world=2, n=3)]  # same keys and pieces: still cached
    assert planner.plan(mine, comm) is plan
    comm.peers = [_state(rank=0, world=2)]  # the peer now holds other pieces: replicated
    replanned = planner.plan(mine, comm)
    assert replanned is not plan and planner.full_plans == 2
    assert len(replanned.writer_of) == 3  # every chunk once, though both ranks hold it


def test_key_mismatch_reports_each_rank() -> None:
    mine, peer = _state(extra="abc"), _state(extra="def")
    with pytest.raises(RankMismatchError) as info:
        Planner().plan(mine, _PeersComm([peer]))
    assert "rank 0 has keys other ranks lack: ['abc']" in str(info.value)
    assert "rank 1 has keys other ranks lack: ['def']" in str(info.value)
    with pytest.raises(RankMismatchError, match=r"rank 1 has keys other ranks lack: \['def'\]"):
        check_same_keys(mine, _PeersComm([peer]))
    comm = _PeersComm([_state()])
    check_same_keys(_state(), comm)  # agreeing ranks: one digest collective, no objects
    assert (comm.collective_count, comm.objects_gathered) == (1, 0)


def test_group_comm_collective_error_is_save_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    import async_ckpt.dist.comm as comm_mod

    comm = GroupComm.__new__(GroupComm)  # no process group needed: the collective is faked
    comm.group, comm.rank, comm.world_size, comm.collective_count = None, 0, 2, 0
    comm._device = torch.device("cpu")

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(comm_mod.dist, "all_to_all_single", boom)
    with pytest.raises(SaveFailedError, match="Connection closed by peer"):
        comm.all_gather_digests(b"\x00" * 32)
    assert comm.collective_count == 1


def _digest_body(rank: int, world_size: int) -> dict[str, Any]:
    comm = GroupComm(None)
    got = comm.all_gather_digests(bytes([rank]) * 32)
    planner = Planner()
    state = _state(rank=rank, world=world_size)
    plan = planner.plan(state, comm)
    before = comm.collective_count
    assert planner.plan(state, comm) is plan
    cached_cost = comm.collective_count - before
    try:
        check_same_keys(_state(rank=rank, world=world_size, extra=f"only{rank}"), comm)
    except RankMismatchError as exc:
        mismatch = str(exc)
    else:
        mismatch = ""
    return {
        "got": got,
        "cached_cost": cached_cost,
        "full_plans": planner.full_plans,
        "msg": mismatch,
    }


@pytest.mark.multiprocess
def test_group_comm_digests_across_ranks() -> None:
    from dist_utils import run_ranks

    results = run_ranks(_digest_body, 3)
    for res in results:
        assert res["got"] == [bytes([r]) * 32 for r in range(3)]
        assert res["cached_cost"] == 1 and res["full_plans"] == 1
        for r in range(3):
            assert f"rank {r} has keys other ranks lack: ['only{r}']" in res["msg"]
