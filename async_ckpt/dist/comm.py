"""Collectives used by checkpoint control traffic (planning, validation, commit).

Only small values travel here, never checkpoint data: fixed-size digests
(one tensor collective, no pickling: the per-save fast path) and small
Python objects (pickled; only when a plan changes, ranks disagree, or at the
commit). ``LocalComm`` is the single-process case; ``GroupComm`` wraps a
process group: the checkpoint engine's own gloo group for asynchronous saves,
the caller's group for synchronous calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ..errors import SaveFailedError


def _peer_failure(fn: Callable) -> Callable:
    """Collective errors (a rank died or timed out) become SaveFailedError."""

    @functools.wraps(fn)
    def wrapper(self: GroupComm, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except SaveFailedError:
            raise
        except Exception as exc:
            raise SaveFailedError(
                f"rank {self.rank}: a checkpoint collective among {self.world_size} ranks failed "
                f"({type(exc).__name__}: {exc}); another rank probably died, hung or timed "
                "out. A save in progress does not commit."
            ) from exc

    return wrapper


class Comm(Protocol):
    """Ranks of one checkpoint; every method is a collective all ranks call in order."""

    rank: int
    world_size: int
    collective_count: int

    def all_gather_digests(self, digest: bytes) -> list[bytes]:
        """Every rank's ``digest``, indexed by rank; all ranks pass the same length."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, indexed by rank."""
        ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``src``'s ``obj`` on every rank."""
        ...

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` on ``dst`` (indexed by rank); None elsewhere."""
        ...


class LocalComm:
    """A world of one: collectives return at once."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.collective_count = 0

    def all_gather_digests(self, digest: bytes) -> list[bytes]:
        self.collective_count += 1
        return [bytes(digest)]

    def all_gather_object(self, obj: Any) -> list[Any]:
        self.collective_count += 1
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        self.collective_count += 1
        return obj

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        self.collective_count += 1
        return [obj]


class GroupComm:
    """Collectives over a torch.distributed (gloo) group owned by the checkpoint engine."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        # The group's store and a name for its saves, where known: each save checks in
        # there first (arrival.check_in), so ranks that never save are named, bounded.
        self.store: Any = None
        self.arrival_scope = ""
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.collective_count = 0
        self._device: torch.device | None = None

    def _tensor_device(self) -> torch.device:
        """Where the group's tensor collectives run: CPU for gloo, the current GPU for NCCL."""
        if self._device is None:
            try:
                from torch.distributed.distributed_c10d import _get_object_coll_device

                self._device = torch.device(_get_object_coll_device(self.group))
            except (ImportError, AttributeError):  # private helper gone: gloo is the norm
                self._device = torch.device("cpu")
        return self._device

    @_peer_failure
    def all_gather_digests(self, digest: bytes) -> list[bytes]:
        """One fixed-size tensor collective: no pickling, no size exchange.

        An all-to-all that sends the same digest to every rank rather than an
        all-gather: gloo's all-gather is a ring of world_size - 1 dependent
        steps, its all-to-all posts every send and receive at once (one step).
        """
        self.collective_count += 1
        n = len(digest)
        device = self._tensor_device()
        sent = torch.frombuffer(bytearray(digest * self.world_size), dtype=torch.uint8)
        received = torch.empty(self.world_size * n, dtype=torch.uint8, device=device)
        dist.all_to_all_single(received, sent.to(device), group=self.group)
        data = received.cpu().numpy().tobytes()
        return [data[r * n : (r + 1) * n] for r in range(self.world_size)]

    @_peer_failure
    def all_gather_object(self, obj: Any) -> list[Any]:
        self.collective_count += 1
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    @_peer_failure
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        self.collective_count += 1
        box = [obj]
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        dist.broadcast_object_list(box, src=global_src, group=self.group)
        return box[0]

    @_peer_failure
    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        self.collective_count += 1
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        global_dst = dist.get_global_rank(self.group, dst) if self.group is not None else dst
        dist.gather_object(obj, out, dst=global_dst, group=self.group)
        return out
