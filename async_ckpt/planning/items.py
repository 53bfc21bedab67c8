"""What one rank saves: write items for tensors, JSON values, pickled objects.

``describe`` turns a flattened state into a :class:`LocalState`: small,
picklable descriptors only. The tensors themselves travel separately (as the
caller's memory for a synchronous save, as staging-arena slices otherwise), in
the same order as ``LocalState.items``.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import StateDictError, UnsafeObjectError
from ..flatten import Flat, KeyPath
from ..format.dtypes import dtype_name, itemsize
from ..format.objects import PLAIN_TYPES, dumps_object, encode_plain, fits_inline


@dataclass(frozen=True)
class TensorItem:
    """One chunk of a tensor that this rank holds, placed in the global tensor."""

    key: str
    path: KeyPath
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    numpy: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * itemsize(getattr(torch, self.dtype))

    @property
    def chunk_id(self) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
        """Equal on every rank that holds the same piece (replicated data)."""
        return (self.key, self.offsets, self.sizes)


@dataclass(frozen=True)
class TensorStub:
    """A tensor key this rank knows but holds no piece of: a DTensor whose mesh leaves
    this rank out. It takes part in key validation, contributes no chunk and no bytes."""

    key: str
    path: KeyPath
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ObjectItem:
    """A pickled non-plain object; ``payload`` was checked to load under the allow-list."""

    key: str
    path: KeyPath
    type_name: str
    payload: bytes


@dataclass
class LocalState:
    """One rank's state, described for planning; tensors are kept beside it."""

    items: list[TensorItem] = field(default_factory=list)
    values: dict[str, tuple[KeyPath, dict[str, Any]]] = field(default_factory=dict)
    objects: list[ObjectItem] = field(default_factory=list)
    containers: dict[str, str] = field(default_factory=dict)
    stubs: list[TensorStub] = field(default_factory=list)  # tensors this rank has no piece of
    # (keys, plan) fingerprints, when known to equal the previous save's (DescribeCache)
    known_fingerprints: tuple[str, str] | None = None

    def keys_fingerprint(self) -> str:
        """Hash of every key with its global shape/dtype: equal on ranks that agree."""
        if self.known_fingerprints is not None:
            return self.known_fingerprints[0]
        h = hashlib.blake2b(digest_size=16)
        # once per key: ranks may hold different numbers of pieces of one tensor
        # (uneven shards cut into row blocks under a staging budget)
        # a rank holding no piece of a tensor (outside its DTensor's mesh) still names it
        known = {(it.key, it.dtype, it.shape) for it in self.items}
        known.update((s.key, s.dtype, s.shape) for s in self.stubs)
        for key, dtype, shape in sorted(known):
            h.update(f"T{key}|{dtype}|{shape}\n".encode())
        for key in sorted(self.values):
            h.update(f"V{key}\n".encode())
        for obj in sorted(self.objects, key=lambda o: o.key):
            h.update(f"O{obj.key}\n".encode())
        return h.hexdigest()

    def plan_fingerprint(self) -> str:
        """Hash of this rank's exact pieces: unchanged means the cached plan still holds."""
        if self.known_fingerprints is not None:
            return self.known_fingerprints[1]
        h = hashlib.blake2b(digest_size=16)
        for it in self.items:
            h.update(f"{it.key}|{it.dtype}|{it.shape}|{it.offsets}|{it.sizes}\n".encode())
        return h.hexdigest()

    def key_summary(self) -> dict[str, str]:
        """Every key with a short description of its kind, for mismatch reports."""
        out = {it.key: f"tensor {it.dtype}{list(it.shape)}" for it in self.items}
        out.update({s.key: f"tensor {s.dtype}{list(s.shape)}" for s in self.stubs})
        out.update({k: "value" for k in self.values})
        out.update({o.key: "object" for o in self.objects})
        return out


def _dtensor_piece(tensor: Any) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """The local tensor of a DTensor and its global offsets and shape."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
    local = tensor.to_local()
    _, offsets = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    return local, tuple(int(o) for o in offsets), tuple(tensor.shape)


def _outside_mesh(tensor: Any) -> bool:
    """Whether this rank is outside a DTensor's mesh, and so holds no piece of it."""
    return tensor.device_mesh.get_coordinate() is None


def _is_dtensor(value: Any) -> bool:
    cls = type(value)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class DescribeCache:
    """The previous save's items, reused while a key holds the same tensor unchanged.

    Repeated saves of one model hand over the same parameter and optimizer
    tensor objects each time; rebuilding their descriptors is most of the
    Python time a save spends before its copy. The tensors are held weakly,
    so the cache keeps nothing alive.
    """

    def __init__(self) -> None:
        # key -> (weak reference to the tensor, its shape, dtype, path, item)
        self._items: dict[str, tuple[Any, torch.Size, torch.dtype, KeyPath, TensorItem]] = {}
        # The previous state's items and other keys, and their fingerprints once computed:
        # a save whose describe is all cache hits in the same order reuses them.
        self._last: tuple[list[TensorItem], tuple, tuple] | None = None
        self._fingerprints: tuple[str, str] | None = None

    def get(self, key: str, leaf: Any, path: KeyPath) -> TensorItem | None:
        hit = self._items.get(key)
        if (
            hit is not None
            and hit[0]() is leaf
            and hit[1] == leaf.shape
            and hit[2] == leaf.dtype
            and hit[3] == path
            and not leaf.is_meta
        ):
            return hit[4]
        return None

    def update(self, entries: dict[str, tuple], state: LocalState) -> None:
        """Remember this save's items; give ``state`` the fingerprints if nothing changed."""
        self._items = entries
        others = (tuple(state.values), tuple(o.key for o in state.objects), tuple(state.stubs))
        last = self._last
        same = (
            last is not None
            and last[1:] == others
            and len(last[0]) == len(state.items)
            and all(a is b for a, b in zip(last[0], state.items, strict=True))
        )
        if not same:
            self._last, self._fingerprints = (list(state.items), *others), None
            return
        if self._fingerprints is None:  # second save of this structure: hash it once
            self._fingerprints = (state.keys_fingerprint(), state.plan_fingerprint())
        state.known_fingerprints = self._fingerprints


def describe(
    flat: Flat, cache: DescribeCache | None = None
) -> tuple[LocalState, list[torch.Tensor]]:
    """Describe a flattened state; returns the descriptors and the tensors, item-aligned."""
    state = LocalState(containers=dict(flat.containers))
    tensors: list[torch.Tensor] = []
    fresh: dict[str, tuple] = {}
    for key, leaf in flat.leaves.items():
        path = flat.paths[key]
        if cache is not None and type(leaf) in _PLAIN_TENSORS:
            item = cache.get(key, leaf, path)
            if item is not None:
                state.items.append(item)
                tensors.append(leaf.detach())  # again: ``.data =`` may have swapped its storage
                fresh[key] = (weakref.ref(leaf), leaf.shape, leaf.dtype, path, item)
                continue
        numpy = False
        if isinstance(leaf, np.ndarray) and leaf.dtype.kind in "biufc" and leaf.dtype != np.uint64:
            if not leaf.dtype.isnative:  # big-endian: stored (and loaded) in native order
                leaf = leaf.astype(leaf.dtype.newbyteorder("="))
            # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
            leaf, numpy = torch.from_numpy(np.require(leaf, requirements="C")), True
        if _is_dtensor(leaf):
            if _outside_mesh(leaf):  # no piece here: known for key validation, nothing stored
                shape = tuple(int(s) for s in leaf.shape)
                state.stubs.append(TensorStub(key, path, dtype_name(leaf.dtype), shape))
                continue
            local, offsets, shape = _dtensor_piece(leaf)
        elif isinstance(leaf, torch.Tensor):
            local, offsets, shape = leaf, (0,) * leaf.dim(), tuple(leaf.shape)
        elif isinstance(leaf, PLAIN_TYPES) and fits_inline(leaf):
            state.values[key] = (path, encode_plain(leaf))
            continue
        else:
            type_name = f"{type(leaf).__module__}.{type(leaf).__qualname__}"
            try:
                payload = dumps_object(leaf)
            except UnsafeObjectError as exc:
                raise UnsafeObjectError(f"cannot save {key!r}: {exc}") from exc
            state.objects.append(ObjectItem(key, path, type_name, payload))
            continue
        if local.device.type == "meta":
            raise StateDictError(
                f"tensor {key!r} is on the meta device and has no data to save; "
                "materialize it (e.g. module.to_empty(device=...) and initialize) first"
            )
        if local.is_sparse or local.layout != torch.strided:
            raise StateDictError(f"tensor {key!r} has layout {local.layout}; save it dense")
        if local.is_conj() or local.is_neg():  # lazy views: store the values they show
            local = local.resolve_conj().resolve_neg()
        item = TensorItem(
            key=key,
            path=path,
            dtype=dtype_name(local.dtype),
            shape=tuple(int(s) for s in shape),
            offsets=offsets,
            sizes=tuple(int(s) for s in local.shape),
            numpy=numpy,
        )
        state.items.append(item)
        tensors.append(local.detach())
        if (
            local is leaf and not numpy
        ):  # plain tensors only: DTensor and numpy leaves are rebuilt each time
            fresh[key] = (weakref.ref(leaf), leaf.shape, leaf.dtype, path, item)
    if cache is not None:
        cache.update(fresh, state)
    return state, tensors


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor's memory (no copy)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())
