"""A rank's local view of a flattened state: distributed leaves as the plain tensor they hold here.

The memory tier (:mod:`async_ckpt.manager.memory_tier`) keeps one checkpoint
per rank, written and read by that rank alone. A DTensor's chunks would only
cover its global shape on all ranks together, so a checkpoint of one rank
holding them would not load (and is refused at commit). In the local view a
DTensor or ShardedTensor leaf is replaced by its local tensor, detached but
sharing its memory: a save stores this rank's bytes under the same key, and
a load into the view fills the distributed tensor in place. Such a checkpoint
restores only onto the same ranks with the same sharding, which is what a
restart after a crash has.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import StateDictError
from .flatten import Flat
from .leaves import (
    LeafKind,
    Piece,
    dtensor_pieces,
    global_dtype_and_shape,
    leaf_kind,
    sharded_pieces,
)


def _local_tensor(key: str, leaf: Any, kind: LeafKind) -> torch.Tensor:
    pieces: list[Piece] = (
        dtensor_pieces(key, leaf, "save") if kind is LeafKind.DTENSOR else sharded_pieces(leaf)
    )
    if not pieces:  # a rank outside the mesh, or without a shard: holds nothing
        dtype, _ = global_dtype_and_shape(leaf, kind)
        return torch.empty(0, dtype=dtype)
    if len(pieces) > 1:
        raise StateDictError(
            f"{key!r} holds {len(pieces)} shards on this rank: the memory tier keeps one "
            "local tensor per key (a DTensor with a plain local tensor, or a ShardedTensor "
            "with one local shard per rank)"
        )
    local = pieces[0].local
    if local.is_meta:  # a load would replace it with a plain tensor, not fill the DTensor
        raise StateDictError(
            f"{key!r} is on the meta device: the memory tier fills distributed tensors in "
            "place, so materialize them (to_empty) first"
        )
    return local.detach()


def local_view(flat: Flat) -> Flat:
    """``flat`` with every DTensor and ShardedTensor leaf replaced by its local tensor
    (in place; returned for chaining). Raises :class:`StateDictError` for a leaf
    with several shards on this rank."""
    for key, leaf in flat.leaves.items():
        kind = leaf_kind(leaf)
        if kind in (LeafKind.DTENSOR, LeafKind.SHARDED):
            flat.leaves[key] = _local_tensor(key, leaf, kind)
    return flat
