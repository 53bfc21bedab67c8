"""Describe a flattened state for saving: descriptors of its leaves, and its tensors.

``describe`` asks :mod:`async_ckpt.state.leaves` what each leaf is and turns
the state into a :class:`LocalState` plus the tensors, item-aligned.
:class:`DescribeCache` makes repeated saves of one model cheap.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..errors import StateDictError, UnsafeObjectError
from ..format.dtypes import dtype_name
from ..format.objects import dumps_object, encode_plain
from .flatten import Flat, KeyPath
from .leaves import (
    PLAIN_TENSORS,
    LeafKind,
    Piece,
    global_dtype_and_shape,
    leaf_kind,
    refuse,
    tensor_piece,
    tensor_pieces,
)
from .model import LocalState, ObjectItem, TensorItem, TensorStub


@dataclass(slots=True)
class _Known:
    """A tensor the previous save described, and what its item depended on."""

    tensor: weakref.ref
    shape: torch.Size
    dtype: torch.dtype
    path: KeyPath
    item: TensorItem

    @classmethod
    def of(cls, leaf: torch.Tensor, path: KeyPath, item: TensorItem) -> _Known:
        return cls(weakref.ref(leaf), leaf.shape, leaf.dtype, path, item)


@dataclass(slots=True)
class _Structure:
    """The previous save's items (the objects) and its other keys, to spot an unchanged state."""

    items: list[TensorItem]
    values: tuple[str, ...]
    objects: tuple[str, ...]
    stubs: tuple[TensorStub, ...]

    @classmethod
    def of(cls, state: LocalState) -> _Structure:
        return cls(
            list(state.items),
            tuple(state.values),
            tuple(o.key for o in state.objects),
            tuple(state.stubs),
        )

    def same_as(self, state: LocalState) -> bool:
        return (
            self.values == tuple(state.values)
            and self.objects == tuple(o.key for o in state.objects)
            and self.stubs == tuple(state.stubs)
            and len(self.items) == len(state.items)
            and all(a is b for a, b in zip(self.items, state.items, strict=True))
        )


class DescribeCache:
    """The previous save's items, reused while a key holds the same tensor unchanged.

    Repeated saves of one model hand over the same parameter and optimizer
    tensor objects each time; rebuilding their descriptors is most of the
    Python time a save spends before its copy. The tensors are held weakly,
    so the cache keeps nothing alive.
    """

    def __init__(self) -> None:
        self._known: dict[str, _Known] = {}
        # The previous state's structure, and its fingerprints once computed: a save
        # whose describe is all cache hits in the same order reuses them.
        self._last: _Structure | None = None
        self._fingerprints: tuple[str, str] | None = None

    def update(self, known: dict[str, _Known], state: LocalState) -> None:
        """Remember this save's items; give ``state`` the fingerprints if nothing changed."""
        self._known = known
        if self._last is None or not self._last.same_as(state):
            self._last, self._fingerprints = _Structure.of(state), None
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
    fresh: dict[str, _Known] = {}
    known_before = cache._known if cache is not None else {}
    items, paths = state.items, flat.paths
    for key, leaf in flat.leaves.items():
        path = paths[key]
        if type(leaf) in PLAIN_TENSORS:
            # DescribeCache.get, inlined: this loop is the caller's cost per tensor.
            known = known_before.get(key)
            if (
                known is not None
                and known.tensor() is leaf
                and known.dtype == leaf.dtype
                and known.shape == leaf.shape
                and known.path == path
                and not leaf.is_meta
            ):  # the record holds for this save too: reuse it as it is.
                items.append(known.item)
                # The tensor itself, not a detached alias (1 us each): the stager copies
                # under no_grad, when the copy starts (``.data =`` swaps are seen).
                tensors.append(leaf)
                fresh[key] = known
                continue
        kind = leaf_kind(leaf)
        if kind is LeafKind.VALUE:
            state.values[key] = (path, encode_plain(leaf))
            continue
        if kind is LeafKind.OBJECT:
            type_name = f"{type(leaf).__module__}.{type(leaf).__qualname__}"
            try:
                payload = dumps_object(leaf)
            except UnsafeObjectError as exc:
                raise UnsafeObjectError(f"cannot save {key!r}: {exc}") from exc
            state.objects.append(ObjectItem(key, path, type_name, payload))
            continue
        if kind is LeafKind.TENSOR or kind is LeafKind.NDARRAY:  # one piece: most leaves
            try:
                piece = tensor_piece(leaf, kind)
            except RuntimeError:  # a tensor without sizes (nested): say why, with its key
                if kind is LeafKind.TENSOR:
                    refuse(key, leaf, "save")
                raise
            item, local = _item(key, path, piece, kind is LeafKind.NDARRAY)
            state.items.append(item)
            # With a cache (a stager copies, under no_grad) a plain tensor goes as itself,
            # as on the known path above, so the next save can take the shortcut too;
            # a synchronous save writes from .numpy(), which needs it detached.
            tensors.append(leaf if local is leaf and cache is not None else local.detach())
            if local is leaf:  # plain tensors only: numpy leaves are rebuilt each time
                fresh[key] = _Known.of(leaf, path, item)
            continue
        pieces = tensor_pieces(key, leaf, kind)
        if not pieces:
            # no piece here (outside a DTensor's mesh, no local shard): known for key
            # validation, nothing stored
            dtype, shape = global_dtype_and_shape(leaf, kind)
            state.stubs.append(TensorStub(key, path, _dtype_name(key, dtype), shape))
            continue
        for piece in pieces:
            item, local = _item(key, path, piece, False)
            state.items.append(item)
            tensors.append(local.detach())
    if cache is not None:
        cache.update(fresh, state)
    return state, tensors


def _item(key: str, path: KeyPath, piece: Piece, numpy: bool) -> tuple[TensorItem, torch.Tensor]:
    """The descriptor of one piece, and its data as saved."""
    local = _checked_local(key, piece.local)
    try:
        dtype = dtype_name(local.dtype)
    except StateDictError as exc:
        raise StateDictError(f"cannot save tensor {key!r}: {exc}") from None
    item = TensorItem(
        key=key,
        path=path,
        dtype=dtype,
        shape=piece.shape,
        offsets=piece.offsets,
        sizes=tuple(local.shape),
        numpy=numpy,
    )
    return item, local


def _dtype_name(key: str, dtype: torch.dtype) -> str:
    try:
        return dtype_name(dtype)
    except StateDictError as exc:
        raise StateDictError(f"cannot save tensor {key!r}: {exc}") from None


def _checked_local(key: str, local: torch.Tensor) -> torch.Tensor:
    """A tensor's data as saved: refuse what has no bytes to save, resolve lazy views."""
    if (
        type(local) not in PLAIN_TENSORS  # a subclass: stored if it only adds methods
        or local.layout != torch.strided
        or local.is_nested
        or local.is_quantized
    ):
        refuse(key, local, "save")  # raises unless its bytes can be stored after all
    if local.is_meta:
        raise StateDictError(
            f"tensor {key!r} is on the meta device and has no data to save; "
            "materialize it (e.g. module.to_empty(device=...) and initialize) first"
        )
    if local.is_conj() or local.is_neg():  # lazy views: store the values they show
        local = local.resolve_conj().resolve_neg()
    return local


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor's memory (no copy)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())
