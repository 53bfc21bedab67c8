"""Conversions: to a ``torch.save`` file, to safetensors, from torch.distributed.checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..api import save
from ..errors import (
    CheckpointError,
    CheckpointExistsError,
    CorruptCheckpointError,
    UnsafeObjectError,
)
from ..format.metadata import Metadata
from ..materialize import materialize
from ..state.flatten import flatten
from ..state.leaves import LeafKind, leaf_kind, ndarray_for_saving
from ..storage.dcp import DcpReader
from ..storage.detect import detect_reader, detect_writer


@dataclass
class Converted:
    """What a conversion wrote: tensors, other leaves, leaves left out (by key)."""

    tensors: int = 0
    others: int = 0
    skipped: list[str] = field(default_factory=list)


def _refuse_existing_file(out: str | os.PathLike, overwrite: bool) -> None:
    if not overwrite and os.path.exists(out):
        raise CheckpointExistsError(f"{os.fspath(out)!r} exists; pass --force to replace it")


def _count(state: dict[str, Any]) -> Converted:
    leaves = flatten(state).leaves.values()
    tensors = sum(leaf_kind(v).has_bytes for v in leaves)
    return Converted(tensors=tensors, others=len(leaves) - tensors)


def to_torch(
    checkpoint_id: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    metadata: Metadata | None = None,
) -> Converted:
    """Write the checkpoint's whole nested state with ``torch.save`` (checksums verified).

    ``metadata`` is the checkpoint's, when the caller has decoded it already.
    """
    _refuse_existing_file(out, overwrite)
    state = materialize(checkpoint_id, metadata=metadata)
    torch.save(state, out)
    return _count(state)


def to_safetensors(
    checkpoint_id: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    metadata: Metadata | None = None,
) -> Converted:
    """Write the checkpoint's tensors to a safetensors file under their flat keys.

    Non-tensor leaves (values, objects) have no place in safetensors: they are
    left out and listed in the result. ``metadata`` is the checkpoint's, when
    the caller has decoded it already.
    """
    from safetensors.torch import save_file

    _refuse_existing_file(out, overwrite)
    flat = flatten(materialize(checkpoint_id, metadata=metadata))
    tensors: dict[str, torch.Tensor] = {}
    result = Converted()
    for key, leaf in flat.leaves.items():
        match leaf_kind(leaf):  # a materialized state holds no DTensor: its pieces are joined
            case LeafKind.TENSOR:
                tensors[key] = leaf.contiguous()
            case LeafKind.NDARRAY:
                tensors[key] = ndarray_for_saving(leaf)
            case _:
                result.skipped.append(key)
    result.others = len(result.skipped)
    try:
        save_file(tensors, os.fspath(out), metadata={"format": "pt"})
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"safetensors cannot store this checkpoint's tensors: {exc}") from exc
    result.tensors = len(tensors)
    return result


def _exists(checkpoint_id: str | os.PathLike) -> bool:
    reader = detect_reader(checkpoint_id)
    try:
        reader.read_metadata()
        return True
    except CheckpointError:
        return False
    finally:
        reader.close()


def from_dcp(
    dcp_dir: str | os.PathLike, out_id: str | os.PathLike, *, overwrite: bool = False
) -> Metadata:
    """Save a torch.distributed.checkpoint directory as an async_ckpt checkpoint.

    The DCP checkpoint is read whole (every rank's shards) into memory, through
    :class:`~async_ckpt.storage.dcp.DcpReader`: its ``.metadata`` is decoded with
    an allow-listed unpickler and its data with ``torch.load(weights_only=True)``,
    so nothing in it can run code. Objects of classes torch does not allow load
    only if allow-listed (``async_ckpt.allow_class``).
    """
    reader = DcpReader(dcp_dir)
    try:
        try:
            meta = reader.translated_metadata()  # CheckpointNotFoundError: no .metadata
            if not overwrite and _exists(out_id):
                raise CheckpointExistsError(
                    f"checkpoint {os.fspath(out_id)!r} already exists; pass --force to replace it"
                )
            state = materialize(storage_reader=reader, metadata=meta)
        except (CorruptCheckpointError, UnsafeObjectError) as exc:
            raise type(exc)(
                f"cannot read the DCP checkpoint {os.fspath(dcp_dir)!r}: {exc}"
            ) from exc
    finally:
        reader.close()
    return save(state, storage_writer=detect_writer(out_id, overwrite=overwrite), no_dist=True)
