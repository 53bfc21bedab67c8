"""The kinds of leaf a state holds, and the rules of each, defined once.

Every leaf of a flattened state is one of six kinds:

* ``TENSOR``: a ``torch.Tensor`` (or ``Parameter``, or a subclass that only adds
  Python methods); stored as chunks of raw bytes.
* ``DTENSOR``: a ``torch.distributed`` DTensor; each rank stores its local piece,
  placed in the global tensor; a rank outside its mesh holds no piece. A local
  tensor that wraps several shards (``LocalShardsWrapper``, TorchRec's uneven
  sharding) gives one piece per shard, placed by its own offsets.
* ``SHARDED``: a ``ShardedTensor`` (FSDP1's ``SHARDED_STATE_DICT``); each of a
  rank's local shards is one piece; a rank may hold none, one or several.
* ``NDARRAY``: a numeric numpy array; stored like a tensor (native byte order),
  loaded back as an array.
* ``VALUE``: a plain value (None, bool, int, float, str, bytes) small enough to
  live in the metadata as JSON.
* ``OBJECT``: anything else; pickled into a data file under the allow-list.

Tensors whose bytes cannot be stored are refused by name (:func:`refusal`):
tensor subclasses that override ``__torch_dispatch__`` other than the kinds
above (FakeTensor, jagged NestedTensor, functional or toy wrappers), nested
tensors, quantized tensors, sparse and other non-strided layouts.

Saving (``describe``), loading (the load's targets) and conversion ask this
module, so adding a kind means adding it here and to their ``match`` on it.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import StateDictError
from ..format.objects import PLAIN_TYPES, fits_inline


class LeafKind(enum.Enum):
    TENSOR = "tensor"
    DTENSOR = "dtensor"
    SHARDED = "sharded"
    NDARRAY = "ndarray"
    VALUE = "value"
    OBJECT = "object"

    @property
    def has_bytes(self) -> bool:
        """Whether leaves of this kind are stored as tensor chunks."""
        return self in _TENSOR_KINDS


_TENSOR_KINDS = frozenset({LeafKind.TENSOR, LeafKind.DTENSOR, LeafKind.SHARDED, LeafKind.NDARRAY})
# Checked by type identity first: most leaves of a state are plain tensors.
PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__
_SHARDED_API = "torch.distributed._shard.sharded_tensor.api"


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a DTensor (checked by name: importing DTensor costs time)."""
    cls = type(value)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def is_sharded_tensor(value: Any) -> bool:
    """Whether ``value`` is a ShardedTensor (without importing it: only once torch has)."""
    api = sys.modules.get(_SHARDED_API)
    return api is not None and isinstance(value, api.ShardedTensorBase)


def is_numeric_ndarray(value: Any) -> bool:
    """Numpy arrays stored as raw bytes: numbers torch can view (not uint64, not objects)."""
    return (
        isinstance(value, np.ndarray) and value.dtype.kind in "biufc" and value.dtype != np.uint64
    )


def leaf_kind(leaf: Any) -> LeafKind:
    """Which kind ``leaf`` is (see the module docstring)."""
    if type(leaf) in PLAIN_TENSORS:
        return LeafKind.TENSOR
    if is_dtensor(leaf):
        return LeafKind.DTENSOR
    if isinstance(leaf, torch.Tensor):
        return LeafKind.SHARDED if is_sharded_tensor(leaf) else LeafKind.TENSOR
    if is_numeric_ndarray(leaf):
        return LeafKind.NDARRAY
    if isinstance(leaf, PLAIN_TYPES) and fits_inline(leaf):
        return LeafKind.VALUE
    return LeafKind.OBJECT


def type_name(value: Any) -> str:
    """``module.QualName`` of ``value``'s type, as messages name it."""
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def overrides_dispatch(cls: type) -> bool:
    """Whether a tensor type intercepts every operation (``__torch_dispatch__``): a wrapper
    whose bytes live elsewhere, or nowhere (FakeTensor), rather than in its own storage."""
    return getattr(cls, "__torch_dispatch__", _PLAIN_DISPATCH) is not _PLAIN_DISPATCH


def refusal(tensor: torch.Tensor) -> str | None:
    """Why the bytes of ``tensor`` (a plain leaf or a local piece) cannot be stored; None if
    they can. The meta device is not judged here: saves and loads treat it differently."""
    cls = type(tensor)
    if cls not in PLAIN_TENSORS and overrides_dispatch(cls):
        return (
            f"it is a {type_name(tensor)}, a tensor subclass that overrides "
            "__torch_dispatch__, whose bytes async_ckpt cannot store (plain tensors, DTensor "
            "and ShardedTensor it can); convert it to one of those first"
        )
    if tensor.is_nested:
        return "it is a nested tensor; store its components (.unbind()) instead"
    if tensor.is_quantized:
        return (
            f"it is a quantized tensor ({tensor.dtype}), whose scale and zero point are not "
            "stored; store .int_repr() with q_scale()/q_zero_point(), or .dequantize()"
        )
    if tensor.layout != torch.strided:
        return f"it has layout {tensor.layout}; store it dense (.to_dense())"
    return None


def refuse(key: str, tensor: torch.Tensor, action: str) -> None:
    """Raise :class:`StateDictError` if ``tensor``'s bytes cannot be stored (see :func:`refusal`).

    ``action`` is "save" or "load into": the message names the key and why.
    """
    why = refusal(tensor)
    if why is not None:
        raise StateDictError(f"cannot {action} tensor {key!r}: {why}")


@dataclass(frozen=True)
class Piece:
    """The part of a global tensor that a leaf holds: its local data and where it sits."""

    local: torch.Tensor
    offsets: tuple[int, ...]
    shape: tuple[int, ...]  # the global shape


def outside_mesh(dtensor: Any) -> bool:
    """Whether this rank is outside a DTensor's mesh, and so holds no piece of it."""
    return dtensor.device_mesh.get_coordinate() is None


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def dtensor_piece(dtensor: Any, local: torch.Tensor | None = None) -> Piece:
    """The local tensor of a DTensor (``local``, if already asked for) and its global
    offsets and shape."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
    _, offsets = compute_local_shape_and_global_offset(
        dtensor.shape, dtensor.device_mesh, dtensor.placements
    )
    local = dtensor.to_local() if local is None else local
    return Piece(local, _ints(offsets), tuple(dtensor.shape))


def is_shards_wrapper(local: torch.Tensor) -> bool:
    """Whether a DTensor's local tensor wraps several shards, each placed by its own offsets
    (``LocalShardsWrapper``: ``local_shards()`` and ``local_offsets()``)."""
    return callable(getattr(local, "local_shards", None)) and callable(
        getattr(local, "local_offsets", None)
    )


def dtensor_pieces(key: str, dtensor: Any, action: str) -> list[Piece]:
    """A DTensor's pieces on this rank: none outside its mesh, one per shard of a shards
    wrapper, else its local tensor. A local tensor of another wrapper type is refused."""
    if outside_mesh(dtensor):
        return []
    local = dtensor.to_local()
    if type(local) in PLAIN_TENSORS or not overrides_dispatch(type(local)):
        return [dtensor_piece(dtensor, local)]
    if not is_shards_wrapper(local):
        raise StateDictError(
            f"cannot {action} DTensor {key!r}: its local tensor is a {type_name(local)}, "
            "a tensor subclass that overrides __torch_dispatch__, whose bytes async_ckpt "
            "cannot store (a plain local tensor or a LocalShardsWrapper it can)"
        )
    shape = tuple(dtensor.shape)
    # An empty wrapper holds no shard but lists one placeholder offset: zip stops at the shards.
    pairs = zip(local.local_shards(), local.local_offsets(), strict=False)
    return [Piece(shard, _ints(offsets), shape) for shard, offsets in pairs]


def sharded_pieces(sharded: Any) -> list[Piece]:
    """A ShardedTensor's local shards, placed by their metadata; none on a rank without any.

    Read through ``metadata()`` and ``local_shards()``: the tensor's own properties
    (``.shape``, ``.dtype``) go through ShardedTensor's deprecated op table.
    """
    shape = _ints(sharded.metadata().size)
    return [
        Piece(shard.tensor, _ints(shard.metadata.shard_offsets), shape)
        for shard in sharded.local_shards()
    ]


def global_dtype_and_shape(leaf: Any, kind: LeafKind) -> tuple[torch.dtype, tuple[int, ...]]:
    """A distributed leaf's dtype and global shape, known on every rank (also one that holds
    no piece of it)."""
    if kind is LeafKind.SHARDED:
        meta = leaf.metadata()
        return meta.tensor_properties.dtype, _ints(meta.size)
    return leaf.dtype, _ints(leaf.shape)


def ndarray_for_saving(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing a numeric array's memory where it can: C order, native byte order."""
    if not array.dtype.isnative:  # big-endian: stored (and loaded) in native order
        array = array.astype(array.dtype.newbyteorder("="))
    # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
    return torch.from_numpy(np.require(array, requirements="C"))


def tensor_piece(leaf: Any, kind: LeafKind, *, for_load: bool = False) -> Piece | None:
    """The one piece a tensor, array or DTensor (with a plain local tensor) leaf holds; None
    for a DTensor whose mesh leaves this rank out. Any leaf: :func:`tensor_pieces`.

    For a load (``for_load``), an array is viewed in place (its bytes are filled);
    for a save it is first brought to C order and native byte order.
    """
    if kind is LeafKind.DTENSOR:
        return None if outside_mesh(leaf) else dtensor_piece(leaf)
    if kind is LeafKind.NDARRAY:
        leaf = torch.from_numpy(leaf) if for_load else ndarray_for_saving(leaf)
    return Piece(leaf, (0,) * leaf.dim(), tuple(leaf.shape))


def tensor_pieces(key: str, leaf: Any, kind: LeafKind, *, for_load: bool = False) -> list[Piece]:
    """Every piece a tensor-kind leaf holds on this rank (possibly none: a DTensor whose mesh
    leaves this rank out, a ShardedTensor without a local shard).

    Raises :class:`StateDictError` naming ``key`` for a leaf whose bytes cannot be
    stored; the pieces' own data (layout, meta device) the caller checks.
    """
    action = "load into" if for_load else "save"
    if kind is LeafKind.SHARDED:
        return sharded_pieces(leaf)
    if kind is LeafKind.DTENSOR:
        return dtensor_pieces(key, leaf, action)
    if kind is LeafKind.TENSOR and (type(leaf) not in PLAIN_TENSORS or leaf.is_nested):
        refuse(key, leaf, action)  # before its shape is asked: a nested tensor has none
    piece = tensor_piece(leaf, kind, for_load=for_load)
    return [] if piece is None else [piece]


def fills_in_place(leaf: Any, kind: LeafKind) -> bool:
    """Whether a load can write a stored tensor into ``leaf`` itself (else it is replaced)."""
    if kind is LeafKind.NDARRAY:
        return bool(leaf.flags.writeable)
    return kind in (LeafKind.TENSOR, LeafKind.DTENSOR, LeafKind.SHARDED)
