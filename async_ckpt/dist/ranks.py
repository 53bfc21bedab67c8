"""Which ranks take part in a save or load, from the process_group/no_dist arguments."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from .arrival import group_store, wait_for_ranks
from .comm import Comm, GroupComm, LocalComm


def use_distributed(process_group: Any, no_dist: bool) -> bool:
    """Whether a call spans several ranks (an initialized group and no ``no_dist``)."""
    if no_dist or not dist.is_available() or not dist.is_initialized():
        return False
    return dist.get_world_size(process_group) > 1


def caller_comm(process_group: Any, no_dist: bool, what: str | None = None) -> Comm:
    """Collectives on the caller's group: only for synchronous calls from the caller's thread.

    With ``what`` (the call, for the message), first wait, bounded, for every rank
    of the group to make this call too (:mod:`.arrival`).
    """
    if not use_distributed(process_group, no_dist):
        return LocalComm()
    comm = GroupComm(process_group)
    if what is not None:
        arrive(process_group, comm.rank, comm.world_size, what)
    return comm


def arrive(process_group: Any, rank: int, world_size: int, what: str) -> None:
    """Wait (bounded) for every rank of ``process_group`` to reach the call ``what``."""
    found = group_store(process_group)
    if found is not None:  # torch hides its store: fall back to the group's own timeout
        store, scope = found
        wait_for_ranks(store, scope, rank, world_size, what)
