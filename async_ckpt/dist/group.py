"""The checkpoint engine's own process group, set up from the caller's thread.

Workers never issue collectives on the training group. For the process
executor, rank 0 serves a TCPStore on a port the OS picks (port 0: no racy
probing) and the address travels to the other ranks over the training group
once, at start; the workers then form their own gloo group through it. The
thread executor gets a fresh gloo group from ``new_group``.
"""

from __future__ import annotations

import datetime
import itertools
import os
import secrets
import socket
from typing import Any

import torch.distributed as dist

from ..errors import SaveFailedError
from .arrival import group_store
from .comm import Comm, GroupComm, LocalComm
from .ranks import arrive

# Numbers the thread executors' groups; equal across ranks, which create them in
# the same order (new_group is a collective).
_THREAD_GROUPS = itertools.count()

DEFAULT_TIMEOUT_S = 600.0


class WorkerGroup:
    """Where the workers of all ranks meet; ``spec()`` is sent with every save."""

    def __init__(self, process_group: Any, timeout_s: float) -> None:
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.timeout_s = timeout_s
        self.epoch = 0
        # the broadcast below is the first collective on the training group: check that
        # every rank came (a save on rank 0 alone would wait there until torch's timeout)
        arrive(process_group, self.rank, self.world_size, "starting async_ckpt's checkpointer")
        self._server = None
        address = None
        if self.rank == 0:
            host = os.environ.get("MASTER_ADDR") or socket.gethostname()
            self._server = dist.TCPStore(
                "0.0.0.0" if host not in ("127.0.0.1", "localhost") else host,
                0,
                is_master=True,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
            address = (host, self._server.port, secrets.token_hex(6))
        box = [address]
        src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        dist.broadcast_object_list(box, src=src, group=process_group)
        self.host, self.port, self.prefix = box[0]

    def spec(self) -> dict[str, Any]:
        """How a worker joins: store address, its rank, and the current epoch's prefix."""
        return {
            "host": self.host,
            "port": self.port,
            "prefix": f"async_ckpt/{self.prefix}/{self.epoch}/",
            "rank": self.rank,
            "world_size": self.world_size,
            "timeout_s": self.timeout_s,
        }

    def next_epoch(self) -> None:
        """After a failed save every rank restarts its worker into a fresh group."""
        self.epoch += 1


def thread_comm(process_group: Any, distributed: bool, timeout_s: float) -> Comm:
    """A gloo group of the same ranks for the thread executor's collectives."""
    if not distributed:
        return LocalComm()
    ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
    arrive(
        process_group,
        dist.get_rank(process_group),
        len(ranks),
        "starting async_ckpt's checkpointer",
    )
    group = dist.new_group(
        ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)
    )
    comm = GroupComm(group)
    found = group_store(process_group)
    if found is not None:  # each checkpointer its own scope: their saves interleave freely
        comm.store = found[0]
        comm.arrival_scope = f"thread-saves/{next(_THREAD_GROUPS)}/{found[1]}"
    return comm


def connect_group(spec: dict[str, Any]) -> Comm:
    """Join the workers' own gloo group through the job's store (never the training group)."""
    timeout = datetime.timedelta(seconds=spec["timeout_s"])
    try:
        store = dist.TCPStore(spec["host"], spec["port"], is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(spec["prefix"], store)
        dist.init_process_group(
            "gloo",
            store=prefixed,
            rank=spec["rank"],
            world_size=spec["world_size"],
            timeout=timeout,
        )
    except Exception as exc:
        raise SaveFailedError(
            f"rank {spec['rank']}: the checkpoint workers of {spec['world_size']} ranks did not "
            f"all meet within {spec['timeout_s']} s ({type(exc).__name__}: {exc}); a rank "
            "probably died or never called save. Nothing was committed."
        ) from exc
    comm = GroupComm(None)
    comm.store, comm.arrival_scope = prefixed, "saves"  # checked in before each save
    return comm
