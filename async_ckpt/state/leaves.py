"""The kinds of leaf a state holds, and the rules of each, defined once.

Every leaf of a flattened state is one of five kinds:

* ``TENSOR``: a ``torch.Tensor`` (or ``Parameter``); stored as chunks of raw bytes.
* ``DTENSOR``: a ``torch.distributed`` DTensor; each rank stores its local piece,
  placed in the global tensor; a rank outside its mesh holds no piece.
* ``NDARRAY``: a numeric numpy array; stored like a tensor (native byte order),
  loaded back as an array.
* ``VALUE``: a plain value (None, bool, int, float, str, bytes) small enough to
  live in the metadata as JSON.
* ``OBJECT``: anything else; pickled into a data file under the allow-list.

Saving (``describe``), loading (the load's targets) and conversion ask this
module, so adding a kind means adding it here and to their ``match`` on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..format.objects import PLAIN_TYPES, fits_inline


class LeafKind(enum.Enum):
    TENSOR = "tensor"
    DTENSOR = "dtensor"
    NDARRAY = "ndarray"
    VALUE = "value"
    OBJECT = "object"

    @property
    def has_bytes(self) -> bool:
        """Whether leaves of this kind are stored as tensor chunks."""
        return self in _TENSOR_KINDS


_TENSOR_KINDS = frozenset({LeafKind.TENSOR, LeafKind.DTENSOR, LeafKind.NDARRAY})
# Checked by type identity first: most leaves of a state are plain tensors.
_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a DTensor (checked by name: importing DTensor costs time)."""
    cls = type(value)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def is_numeric_ndarray(value: Any) -> bool:
    """Numpy arrays stored as raw bytes: numbers torch can view (not uint64, not objects)."""
    return (
        isinstance(value, np.ndarray) and value.dtype.kind in "biufc" and value.dtype != np.uint64
    )


def leaf_kind(leaf: Any) -> LeafKind:
    """Which kind ``leaf`` is (see the module docstring)."""
    if type(leaf) in _PLAIN_TENSORS:
        return LeafKind.TENSOR
    if is_dtensor(leaf):
        return LeafKind.DTENSOR
    if isinstance(leaf, torch.Tensor):
        return LeafKind.TENSOR
    if is_numeric_ndarray(leaf):
        return LeafKind.NDARRAY
    if isinstance(leaf, PLAIN_TYPES) and fits_inline(leaf):
        return LeafKind.VALUE
    return LeafKind.OBJECT


@dataclass(frozen=True)
class Piece:
    """The part of a global tensor that a leaf holds: its local data and where it sits."""

    local: torch.Tensor
    offsets: tuple[int, ...]
    shape: tuple[int, ...]  # the global shape


def outside_mesh(dtensor: Any) -> bool:
    """Whether this rank is outside a DTensor's mesh, and so holds no piece of it."""
    return dtensor.device_mesh.get_coordinate() is None


def dtensor_piece(dtensor: Any) -> Piece:
    """The local tensor of a DTensor and its global offsets and shape."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
    _, offsets = compute_local_shape_and_global_offset(
        dtensor.shape, dtensor.device_mesh, dtensor.placements
    )
    return Piece(dtensor.to_local(), tuple(int(o) for o in offsets), tuple(dtensor.shape))


def ndarray_for_saving(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing a numeric array's memory where it can: C order, native byte order."""
    if not array.dtype.isnative:  # big-endian: stored (and loaded) in native order
        array = array.astype(array.dtype.newbyteorder("="))
    # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
    return torch.from_numpy(np.require(array, requirements="C"))


def tensor_piece(leaf: Any, kind: LeafKind, *, for_load: bool = False) -> Piece | None:
    """The piece a tensor-kind leaf holds; None for a DTensor whose mesh leaves this rank out.

    For a load (``for_load``), an array is viewed in place (its bytes are filled);
    for a save it is first brought to C order and native byte order.
    """
    if kind is LeafKind.DTENSOR:
        return None if outside_mesh(leaf) else dtensor_piece(leaf)
    if kind is LeafKind.NDARRAY:
        leaf = torch.from_numpy(leaf) if for_load else ndarray_for_saving(leaf)
    return Piece(leaf, (0,) * leaf.dim(), tuple(leaf.shape))


def fills_in_place(leaf: Any, kind: LeafKind) -> bool:
    """Whether a load can write a stored tensor into ``leaf`` itself (else it is replaced)."""
    if kind is LeafKind.NDARRAY:
        return bool(leaf.flags.writeable)
    return kind in (LeafKind.TENSOR, LeafKind.DTENSOR)
