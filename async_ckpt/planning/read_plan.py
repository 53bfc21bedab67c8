"""The read plan of a load: which stored entries go where, and which bytes to fetch.

Pure planning, no I/O: it matches the caller's keys with the checkpoint's,
decides for each entry whether it fills a caller's tensor in place (a tensor,
a DTensor's local piece or shards, a ShardedTensor's local shards; a
meta-device tensor is first replaced by a real one, as DCP does), becomes a
new tensor, an object to unpickle or a value, and groups the chunk reads
(only the stored chunks that overlap a target, back-to-back ones together on
stores that charge per request). :mod:`async_ckpt.pipeline.load` executes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ShapeMismatchError, StateDictError
from ..format.dtypes import dtype_from_name, dtype_name, is_lossless_cast
from ..format.metadata import Chunk, Metadata, ObjectEntry, TensorEntry
from ..format.objects import decode_plain
from ..state.flatten import Flat
from ..state.leaves import (
    LeafKind,
    fills_in_place,
    leaf_kind,
    overrides_dispatch,
    refuse,
    tensor_pieces,
)

# Leaves that are one whole tensor (a tensor or an array): loaded into from an entry of the
# other kind, they are handed back as the checkpoint held it (distributed leaves stay so).
_ONE_PIECE = (LeafKind.TENSOR, LeafKind.NDARRAY)

WINDOW_BYTES = 64 * 1024 * 1024
"""The most bytes one coalesced read fetches (back-to-back chunks of one file)."""

SMALL_CHUNK_BYTES = 256 * 1024
"""Chunks this small are read together with their neighbours on every store: one
request per tensor costs more than the bytes at 100k small tensors."""

SMALL_WINDOW_BYTES = 4 * 1024 * 1024
"""The most bytes one read of small chunks fetches where the store does not coalesce."""


@dataclass
class Target:
    """Where one stored tensor's bytes go."""

    key: str
    tensor: torch.Tensor  # the caller's tensor, a local shard, or a tensor the load made
    offsets: tuple[int, ...]  # its place in the stored tensor
    entry: TensorEntry


@dataclass
class KeyMatch:
    """The caller's keys against the checkpoint's."""

    missing: list[str]  # the caller has them, the checkpoint does not
    unexpected: list[str]  # the checkpoint has them, the caller has no place for them
    adopt: list[str]  # the checkpoint has them under a Stateful object: created for it


@dataclass
class ReadPlan:
    """What one load reads, before any memory is allocated for it."""

    targets: list[Target] = field(default_factory=list)  # caller's tensors, filled in place
    fresh: list[tuple[str, TensorEntry]] = field(default_factory=list)  # tensors to create
    objects: list[tuple[str, ObjectEntry]] = field(default_factory=list)  # to unpickle
    # leaves set in the caller's containers once read: values, and for tensor entries the
    # leaf made for a meta-device one, or None for the target tensor itself (kind changed)
    replaced: dict[str, Any] = field(default_factory=dict)
    files: set[str] = field(default_factory=set)  # data files the reads touch


def _under_stateful(key: str, flat: Flat) -> bool:
    return any(key.startswith(prefix + ".") for prefix in flat.stateful if prefix)


def match_keys(flat: Flat, meta: Metadata) -> KeyMatch:
    """Compare keys. Inside a Stateful object (optimizer, module) the checkpoint is
    authoritative: entries the fresh object lacks yet (optimizer moments) are adopted."""
    missing = sorted(k for k in flat.leaves if k not in meta.entries)
    extra = [k for k in meta.entries if k not in flat.leaves]
    adopt = [k for k in extra if _under_stateful(k, flat)]
    unexpected = sorted(k for k in extra if not _under_stateful(k, flat))
    return KeyMatch(missing, unexpected, adopt)


def overlap(
    a_off: tuple[int, ...], a_size: tuple[int, ...], b_off: tuple[int, ...], b_size: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The region two boxes share (offsets, sizes), or None if they do not meet."""
    if a_off == b_off and a_size == b_size:  # the common case: a whole tensor
        return (a_off, a_size) if 0 not in a_size else None
    lo = [max(a, b) for a, b in zip(a_off, b_off, strict=True)]
    hi = [min(a + s, b + t) for a, s, b, t in zip(a_off, a_size, b_off, b_size, strict=True)]
    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
        return None
    return tuple(lo), tuple(h - lo_ for lo_, h in zip(lo, hi, strict=True))


def _check_shape(key: str, shape: tuple[int, ...], entry: TensorEntry) -> None:
    if tuple(shape) != entry.shape:
        raise ShapeMismatchError(
            f"tensor {key!r} has shape {list(shape)} in the state dict but "
            f"{list(entry.shape)} in the checkpoint; build the model with the saved "
            "configuration, or leave this key out of the state dict you load into "
            # DCP's phrase, which existing code matches
            f"(Size mismatch between saved {list(entry.shape)} and current: {list(shape)} for {key})"
        )


def _in_place_targets(key: str, leaf: Any, kind: LeafKind, entry: TensorEntry) -> list[Target]:
    """The caller's tensor, or its local shards, to fill; none where this rank holds no piece
    (a DTensor whose mesh leaves it out, a ShardedTensor without a local shard)."""
    targets = []
    for piece in tensor_pieces(key, leaf, kind, for_load=True):
        local = piece.local
        if kind is not LeafKind.TENSOR:  # pieces of a DTensor or ShardedTensor
            refuse(key, local, "load into")
        elif local.layout != torch.strided or local.is_nested or local.is_quantized:
            refuse(key, local, "load into")
        _check_shape(key, piece.shape, entry)
        if local.is_meta:  # the shards of a ShardedTensor or LocalShardsWrapper
            raise StateDictError(
                f"cannot load into tensor {key!r}: its shards are on the meta device "
                "(a sharded tensor is not rebuilt from the checkpoint, as in DCP); "
                "allocate them first (e.g. module.to_empty(device=...))"
            )
        targets.append(Target(key, local, piece.offsets, entry))
    return targets


def _meta_load_device() -> torch.device:
    """Where a meta-device tensor loaded into is materialised, as DCP does: the default
    process group's device (CUDA's current device under NCCL), CPU without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    try:  # a pybind property; DCP's own helper for it is deprecated and warns
        types = dist.distributed_c10d._get_default_group()._device_types
    except Exception:
        return torch.device("cpu")
    if len(types) != 1 or types[0].type == "cpu":
        return torch.device("cpu")
    return _current(types[0].type)


def _current(device_type: str) -> torch.device:
    """``device_type``'s current device (``cuda`` -> ``cuda:<current>``)."""
    module = getattr(torch, device_type, None)
    current = getattr(module, "current_device", None)
    return torch.device(device_type, current()) if callable(current) else torch.device(device_type)


def _materialized(key: str, leaf: Any, kind: LeafKind, entry: TensorEntry) -> Any:
    """A real leaf to load into in place of a meta-device one, or None if ``leaf`` has data.

    As DCP's load does: a meta tensor becomes a tensor of its shape and dtype on
    the default process group's device, a DTensor with a meta local tensor a
    DTensor with the same mesh, placements and global shape on its mesh's
    device. The load fills it and sets it in the caller's container (so
    ``model.load_state_dict(sd, assign=True)`` can take it). Shards of a
    ShardedTensor or LocalShardsWrapper on the meta device are refused.
    """
    if kind is LeafKind.TENSOR:
        if overrides_dispatch(type(leaf)) or not leaf.is_meta:
            return None
        _check_shape(key, tuple(leaf.shape), entry)
        return torch.zeros(leaf.shape, dtype=leaf.dtype, device=_meta_load_device())
    if kind is not LeafKind.DTENSOR:
        return None
    local = leaf.to_local()
    if overrides_dispatch(type(local)) or not local.is_meta:
        return None
    _check_shape(key, tuple(leaf.shape), entry)
    from torch.distributed.tensor import DTensor

    mesh = leaf.device_mesh
    device = _current(mesh.device_type) if mesh.device_type != "cpu" else torch.device("cpu")
    return DTensor.from_local(
        torch.zeros(local.shape, dtype=local.dtype, device=device),
        mesh,
        leaf.placements,
        run_check=False,
        shape=leaf.shape,
        stride=leaf.stride(),
    )


def _check_cast(key: str, entry: TensorEntry, target: torch.dtype) -> None:
    """Refuse, before anything is read, a load that would change stored values."""
    stored = dtype_from_name(entry.dtype)
    if not is_lossless_cast(stored, target):
        raise ShapeMismatchError(
            f"tensor {key!r} is {entry.dtype} in the checkpoint but {dtype_name(target)} in the "
            f"state dict: loading would cast values and lose some (e.g. float -> int truncates, "
            "complex -> real drops the imaginary part, float32 -> float16 overflows). Load into "
            f"a {entry.dtype} tensor, or pass allow_lossy_cast=True to cast anyway."
        )


def plan_reads(
    flat: Flat, meta: Metadata, adopt: list[str], *, allow_lossy_cast: bool = False
) -> ReadPlan:
    """Plan the load of every key both sides have, plus ``adopt``; refuses bad shapes
    and lossy casts before anything is read."""
    plan = ReadPlan()
    for key in [k for k in flat.leaves if k in meta.entries] + adopt:
        entry = meta.entries[key]
        if isinstance(entry, ObjectEntry):
            plan.objects.append((key, entry))
            plan.files.add(entry.file)
            continue
        if not isinstance(entry, TensorEntry):
            plan.replaced[key] = decode_plain(entry.value)
            continue
        leaf = flat.leaves.get(key)
        kind = leaf_kind(leaf) if key in flat.leaves else None
        if kind is None or not kind.has_bytes or not fills_in_place(leaf, kind):
            plan.fresh.append((key, entry))
            plan.files.update(c.file for c in entry.chunks)
            continue
        real = _materialized(key, leaf, kind, entry)
        if real is not None:
            if entry.numpy and kind is LeafKind.TENSOR:  # kind changed: what the checkpoint held
                plan.fresh.append((key, entry))
                plan.files.update(c.file for c in entry.chunks)
                continue
            leaf = plan.replaced[key] = real
        for target in _in_place_targets(key, leaf, kind, entry):
            if not allow_lossy_cast:
                _check_cast(key, entry, target.tensor.dtype)
            plan.targets.append(target)
            shape = tuple(target.tensor.shape)
            plan.files.update(
                c.file
                for c in entry.chunks
                if overlap(c.offsets, c.sizes, target.offsets, shape) is not None
            )
        if real is None and (kind is LeafKind.NDARRAY) != entry.numpy and kind in _ONE_PIECE:
            plan.replaced[key] = None  # kind changed: hand back what the checkpoint held
    return plan


def read_groups(targets: list[Target], coalesce: bool) -> list[list[tuple[Target, Chunk]]]:
    """The chunk reads of ``targets``, in file order; each group is one request.

    With ``coalesce`` (stores that charge per request: latency, and some servers
    read the whole object per ranged GET) back-to-back chunks of one file up to
    :data:`WINDOW_BYTES` form one group. Otherwise only back-to-back chunks of at
    most :data:`SMALL_CHUNK_BYTES` do, up to :data:`SMALL_WINDOW_BYTES`: a large
    chunk is read straight into its tensor, with no copy through a window.
    """
    tasks = [
        (t, c)
        for t in targets
        for c in t.entry.chunks
        if overlap(c.offsets, c.sizes, t.offsets, tuple(t.tensor.shape)) is not None
    ]
    tasks.sort(key=lambda tc: (tc[1].file, tc[1].offset))
    window = WINDOW_BYTES if coalesce else SMALL_WINDOW_BYTES
    groups: list[list[tuple[Target, Chunk]]] = []
    for t, c in tasks:
        last = groups[-1] if groups else None
        if last is not None and (coalesce or c.nbytes <= SMALL_CHUNK_BYTES):
            first, prev = last[0][1], last[-1][1]
            joins = coalesce or prev.nbytes <= SMALL_CHUNK_BYTES
            adjacent = prev.file == c.file and c.offset == prev.offset + prev.nbytes
            if joins and adjacent and c.offset + c.nbytes - first.offset <= window:
                last.append((t, c))
                continue
        groups.append([(t, c)])
    return groups
