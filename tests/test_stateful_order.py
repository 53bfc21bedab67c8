"""Stateful objects are called in the same order on every rank, whatever the dict order.

Objects whose ``state_dict``/``load_state_dict`` run collectives (FSDP's
optimizer state, for one) deadlock, or exchange the wrong data, when ranks
call them in different orders. Here each object all-reduces a value tagged
by its name: a mismatched order sums one object's tag with another's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks

import async_ckpt as ac
from async_ckpt.state.flatten import flatten

pytestmark = pytest.mark.multiprocess

TAGS = {"alpha": 1, "omega": 1000}  # names of equal length: a tie in load's depth order


class _Collective:
    """All-reduces ``tag * (rank + 1)`` in both ``state_dict`` and ``load_state_dict``."""

    def __init__(self, name: str, rank: int) -> None:
        self.tag, self.rank = TAGS[name], rank
        self.value = torch.full((3,), float(self.tag))
        self.saw_in_state_dict: list[float] = []
        self.saw_in_load: list[float] = []

    def _reduce(self) -> float:
        t = torch.tensor([float(self.tag * (self.rank + 1))], dtype=torch.float64)
        dist.all_reduce(t)  # paired with whichever object the other rank calls now
        return t.item()

    def state_dict(self) -> dict:
        self.saw_in_state_dict.append(self._reduce())
        return {"value": self.value, "tag": self.tag}

    def load_state_dict(self, sd: dict) -> None:
        self.saw_in_load.append(self._reduce())
        self.value = sd["value"]


def _layout(objs: dict[str, _Collective], layout: str, reverse: bool) -> dict:
    names = sorted(objs, reverse=reverse)
    if layout == "flat":
        return {"step": 7, **{n: objs[n] for n in names}, "w": torch.ones(2)}
    # Stateful objects inside plain dicts whose keys come in opposite orders
    return {"outer": {f"{n}_group": {"obj": objs[n], "x": torch.ones(1)} for n in names}}


def _body(rank, world_size, root, layout):
    objs = {name: _Collective(name, rank) for name in TAGS}
    sd = _layout(objs, layout, reverse=rank == 1)  # insertion orders differ between ranks
    ac.save(sd, checkpoint_id=f"{root}/ckpt")
    for obj in objs.values():
        obj.value = torch.zeros(3)
    ac.load(sd, checkpoint_id=f"{root}/ckpt")
    flatten(sd)  # a third round of state_dict calls, flatten alone
    for obj in objs.values():
        both = 3.0 * obj.tag  # tag * 1 on rank 0 plus tag * 2 on rank 1: the same object
        assert obj.saw_in_state_dict == [both] * 3, (obj.tag, obj.saw_in_state_dict)
        assert obj.saw_in_load == [both], (obj.tag, obj.saw_in_load)
        assert torch.equal(obj.value, torch.full((3,), float(obj.tag)))
    return True


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_stateful_collectives_pair_up_across_ranks(tmp_path, layout):
    # a timeout, so that an order that deadlocks fails the test instead of hanging it
    assert run_ranks(_body, 2, str(tmp_path), layout, timeout=60) == [True, True]
