"""What one rank saves, described: tensor chunks, JSON values, pickled objects.

A :class:`LocalState` (built by :func:`async_ckpt.state.describe.describe`)
holds small, picklable descriptors only. The tensors themselves travel
separately (as the caller's memory for a synchronous save, as staging-arena
slices otherwise), in the same order as ``LocalState.items``.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..format.dtypes import itemsize
from .flatten import KeyPath


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

    @functools.cached_property  # asked for several times per item per save
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
