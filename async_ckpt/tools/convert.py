"""Conversions: to a ``torch.save`` file, to safetensors, from torch.distributed.checkpoint."""

from __future__ import annotations

import json
import math
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
from ..format.dtypes import dtype_from_name, itemsize
from ..format.metadata import Metadata, TensorEntry
from ..materialize import entry_metadata, leaf_at, materialize
from ..pipeline.progress import byte_bar
from ..state.describe import tensor_bytes
from ..state.flatten import flatten
from ..state.leaves import leaf_kind, ndarray_for_saving
from ..storage.base import checkpoint_metadata
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


# safetensors' dtype names; a dtype it has no name for cannot be converted
_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}


def to_safetensors(
    checkpoint_id: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    metadata: Metadata | None = None,
    progress: bool = False,
) -> Converted:
    """Write the checkpoint's tensors to a safetensors file under their flat keys.

    Streams entry by entry: memory holds the largest tensor, not the
    checkpoint. The file appears complete or not at all (written beside it,
    then renamed). Non-tensor leaves (values, objects) have no place in
    safetensors: they are left out and listed in the result. ``metadata`` is
    the checkpoint's, when the caller has decoded it already; ``progress``
    draws a bar (bytes) on stderr.
    """
    _refuse_existing_file(out, overwrite)
    meta = metadata if metadata is not None else _metadata(checkpoint_id)
    tensors = sorted(k for k, e in meta.entries.items() if isinstance(e, TensorEntry))
    result = Converted(skipped=sorted(k for k in meta.entries if k not in set(tensors)))
    result.others = len(result.skipped)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in tensors:
        entry = meta.entries[key]
        assert isinstance(entry, TensorEntry)
        name = _SAFETENSORS_DTYPES.get(entry.dtype)
        if name is None:
            raise CheckpointError(
                f"safetensors cannot store tensor {key!r}: it has no dtype {entry.dtype}"
            )
        nbytes = math.prod(entry.shape) * itemsize(dtype_from_name(entry.dtype))
        header[key] = {
            "dtype": name,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    temp = f"{os.fspath(out)}.tmp-{os.getpid()}"
    try:
        with open(temp, "wb") as f, byte_bar(offset, "convert", progress) as bar:
            f.write(len(encoded).to_bytes(8, "little") + encoded)
            for key in tensors:
                part = entry_metadata(meta, key)
                state = materialize(
                    storage_reader=detect_reader(checkpoint_id), metadata=part, keys=[key]
                )
                value = leaf_at(state, part.entries[key].path)
                tensor = value if isinstance(value, torch.Tensor) else ndarray_for_saving(value)
                view = tensor_bytes(tensor.contiguous())
                f.write(view)
                bar.update(len(view))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, out)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    result.tensors = len(tensors)
    return result


def _metadata(checkpoint_id: str | os.PathLike) -> Metadata:
    reader = detect_reader(checkpoint_id)
    try:
        return checkpoint_metadata(reader)
    finally:
        reader.close()


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
