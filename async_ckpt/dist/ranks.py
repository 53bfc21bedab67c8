"""Which ranks take part in a save or load, from the process_group/no_dist arguments."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from .comm import Comm, GroupComm, LocalComm


def use_distributed(process_group: Any, no_dist: bool) -> bool:
    """Whether a call spans several ranks (an initialized group and no ``no_dist``)."""
    if no_dist or not dist.is_available() or not dist.is_initialized():
        return False
    return dist.get_world_size(process_group) > 1


def caller_comm(process_group: Any, no_dist: bool) -> Comm:
    """Collectives on the caller's group: only for synchronous calls from the caller's thread."""
    if use_distributed(process_group, no_dist):
        return GroupComm(process_group)
    return LocalComm()
