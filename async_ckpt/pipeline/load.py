"""Load a checkpoint into the caller's state dict, in place, verifying checksums.

Tensors are filled in place (device and dtype of the caller's tensor kept);
other leaves are replaced. A caller's tensor may cover any region of the
stored tensor (a DTensor shard): only the stored chunks that overlap it are
read, and of those only the rows needed, rounded out to checksum blocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import (
    CheckpointReplacedError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    KeyMismatchError,
    ShapeMismatchError,
    StateDictError,
)
from ..flatten import Flat, flatten, key_of, set_leaf
from ..format.checksum import block_checksums
from ..format.dtypes import dtype_from_name, dtype_name, is_lossless_cast, itemsize
from ..format.metadata import Chunk, Metadata, ObjectEntry, TensorEntry, decode_metadata
from ..format.objects import decode_plain, loads_object
from ..planning.items import _dtensor_piece, _is_dtensor, _outside_mesh
from ..storage.base import StorageReader

DEFAULT_READ_THREADS = 4


@dataclass
class LoadResult:
    """What a load did not match: keys the caller asked for but the checkpoint lacks,
    and keys the checkpoint holds that the caller's state dict has no place for."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


@dataclass
class _Target:
    key: str
    tensor: torch.Tensor  # where the bytes go (the caller's tensor, or a local shard)
    offsets: tuple[int, ...]  # its place in the stored tensor
    entry: TensorEntry


def verify_blocks(
    data: memoryview, chunk: Chunk, first_block: int, block_size: int, key: str
) -> None:
    """Check ``data`` (blocks ``first_block``.. of ``chunk``) against the stored checksums."""
    for n, crc in enumerate(block_checksums(data, block_size)):
        if crc != chunk.checksums[first_block + n]:
            start = chunk.offset + (first_block + n) * block_size
            raise ChecksumMismatchError(
                f"checksum mismatch in tensor {key!r}: data file {chunk.file!r}, bytes from "
                f"{start}; the checkpoint is corrupted. Load an earlier checkpoint, or pass "
                "verify=False to load the damaged data anyway."
            )


def _overlap(a_off, a_size, b_off, b_size) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    lo = [max(a, b) for a, b in zip(a_off, b_off, strict=True)]
    hi = [min(a + s, b + t) for a, s, b, t in zip(a_off, a_size, b_off, b_size, strict=True)]
    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
        return None
    return tuple(lo), tuple(h - lo_ for lo_, h in zip(lo, hi, strict=True))


def _read_chunk_part(
    reader: StorageReader,
    target: _Target,
    chunk: Chunk,
    meta: Metadata,
    verify: bool,
) -> None:
    """Copy the part of ``chunk`` that overlaps ``target`` into the target tensor."""
    entry, dest = target.entry, target.tensor
    ov = _overlap(chunk.offsets, chunk.sizes, target.offsets, tuple(dest.shape))
    if ov is None:
        return
    lo, size = ov
    dtype = dtype_from_name(entry.dtype)
    whole = lo == chunk.offsets and size == chunk.sizes and tuple(dest.shape) == chunk.sizes
    if (
        whole
        and dest.device.type == "cpu"
        and dest.dtype == dtype
        and dest.is_contiguous()
        and chunk.nbytes > 0
    ):
        view = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
        reader.read_into(chunk.file, chunk.offset, view)
        if verify:
            verify_blocks(view, chunk, 0, meta.block_size, target.key)
        return
    # Rows [r0, r1) of the chunk (dim 0) hold the overlap; read them, whole blocks.
    row_bytes = math.prod(chunk.sizes[1:]) * itemsize(dtype) if chunk.sizes else chunk.nbytes
    r0 = lo[0] - chunk.offsets[0] if chunk.sizes else 0
    r1 = r0 + size[0] if chunk.sizes else 1
    block = meta.block_size
    start, end = r0 * row_bytes, r1 * row_bytes
    if verify:
        start, end = (start // block) * block, min(-(-end // block) * block, chunk.nbytes)
    buf = torch.empty(end - start, dtype=torch.uint8)
    view = memoryview(buf.numpy()) if end > start else memoryview(b"")
    if end > start:
        reader.read_into(chunk.file, chunk.offset + start, view)
        if verify:
            verify_blocks(view, chunk, start // block, block, target.key)
    skip = r0 * row_bytes - start
    rows = buf[skip : skip + (r1 - r0) * row_bytes].view(dtype)
    src = rows.reshape((r1 - r0, *chunk.sizes[1:]) if chunk.sizes else ())
    if chunk.sizes:
        index = [slice(0, r1 - r0)] + [
            slice(a - c, a - c + s)
            for a, c, s in zip(lo[1:], chunk.offsets[1:], size[1:], strict=True)
        ]
        src = src[tuple(index)]
        dst_index = tuple(
            slice(a - t, a - t + s) for a, t, s in zip(lo, target.offsets, size, strict=True)
        )
        dest[dst_index].copy_(src)
    else:
        dest.copy_(src)


def _as_target(key: str, leaf: Any, entry: TensorEntry) -> _Target | None:
    """Where ``leaf``'s bytes go; None for a DTensor whose mesh leaves this rank out."""
    if _is_dtensor(leaf):
        if _outside_mesh(leaf):  # nothing to fill here (its global shape may be unknown too)
            return None
        local, offsets, shape = _dtensor_piece(leaf)
    elif isinstance(leaf, torch.Tensor):
        local, offsets, shape = leaf, (0,) * leaf.dim(), tuple(leaf.shape)
    else:  # numpy array, filled in place through a shared-memory tensor view
        local = torch.from_numpy(leaf)
        offsets, shape = (0,) * local.dim(), tuple(local.shape)
    if tuple(shape) != entry.shape:
        raise ShapeMismatchError(
            f"tensor {key!r} has shape {list(shape)} in the state dict but "
            f"{list(entry.shape)} in the checkpoint; build the model with the saved "
            "configuration, or leave this key out of the state dict you load into"
        )
    return _Target(key, local, offsets, entry)


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


def _new_tensor(entry: TensorEntry) -> torch.Tensor:
    # zeros, not empty: never hand back leftover process memory, whatever the metadata says
    return torch.zeros(entry.shape, dtype=dtype_from_name(entry.dtype))


def _fits_in_place(leaf: Any) -> bool:
    if isinstance(leaf, torch.Tensor) or _is_dtensor(leaf):
        return True
    return (
        isinstance(leaf, np.ndarray)
        and leaf.flags.writeable
        and leaf.dtype.kind in "biufc"
        and leaf.dtype != np.uint64
    )


def _under_stateful(key: str, flat: Flat) -> bool:
    return any(key.startswith(prefix + ".") for prefix in flat.stateful if prefix)


def _check_file_sizes(names: set[str], meta: Metadata, reader: StorageReader) -> None:
    """Refuse before allocating anything if a data file is not the size the metadata says."""
    for name in sorted(names):
        actual = reader.file_size(name)
        if actual is not None and actual != meta.files[name]:
            raise CorruptCheckpointError(
                f"data file {name!r} of checkpoint {reader.checkpoint_id!r} holds {actual} bytes "
                f"but the metadata records {meta.files[name]}: the file is truncated or replaced, "
                "or the metadata is damaged. Load an earlier checkpoint."
            )


def _read_all(
    flat: Flat,
    meta: Metadata,
    reader: StorageReader,
    adopt: list[str],
    verify: bool,
    read_threads: int,
    allow_lossy_cast: bool = False,
    verify_first: bool = False,
) -> tuple[list[_Target], dict[str, Any]]:
    """Read every entry the load needs; returns the tensor targets and the leaves to set."""
    targets: list[_Target] = []
    fresh: list[tuple[str, TensorEntry]] = []
    objects: list[tuple[str, ObjectEntry]] = []
    replaced: dict[str, Any] = {}
    for key in [k for k in flat.leaves if k in meta.entries] + adopt:
        entry = meta.entries[key]
        leaf = flat.leaves.get(key)
        if isinstance(entry, TensorEntry):
            if key in flat.leaves and _fits_in_place(leaf):
                target = _as_target(key, leaf, entry)
                if target is not None:
                    if not allow_lossy_cast:
                        _check_cast(key, entry, target.tensor.dtype)
                    targets.append(target)
                if isinstance(leaf, np.ndarray) != entry.numpy and not _is_dtensor(leaf):
                    replaced[key] = None  # kind changed: hand back what the checkpoint held
            else:
                fresh.append((key, entry))
        elif isinstance(entry, ObjectEntry):
            objects.append((key, entry))
        else:
            replaced[key] = decode_plain(entry.value)

    needed = {e.file for _, e in objects}
    needed |= {c.file for _, e in fresh for c in e.chunks}
    for t in targets:
        shape = tuple(t.tensor.shape)
        needed |= {
            c.file
            for c in t.entry.chunks
            if _overlap(c.offsets, c.sizes, t.offsets, shape) is not None
        }
    _check_file_sizes(needed, meta, reader)

    # verify_first: read and verify into scratch tensors, touch the caller's only after
    staged: list[tuple[torch.Tensor, torch.Tensor]] = []
    if verify_first:
        for n, t in enumerate(targets):
            scratch = torch.empty(tuple(t.tensor.shape), dtype=t.tensor.dtype)
            staged.append((t.tensor, scratch))
            targets[n] = _Target(t.key, scratch, t.offsets, t.entry)
    for key, entry in fresh:
        tensor = _new_tensor(entry)
        targets.append(_Target(key, tensor, (0,) * tensor.dim(), entry))
        replaced[key] = tensor
    for key, entry in objects:
        buf = bytearray(entry.nbytes)
        reader.read_into(entry.file, entry.offset, memoryview(buf))
        if verify:
            chunk = Chunk((), (), entry.file, entry.offset, entry.nbytes, entry.checksums)
            verify_blocks(memoryview(buf), chunk, 0, meta.block_size, key)
        replaced[key] = loads_object(bytes(buf))

    tasks = [
        (t, c)
        for t in targets
        for c in t.entry.chunks
        if _overlap(c.offsets, c.sizes, t.offsets, tuple(t.tensor.shape)) is not None
    ]
    tasks.sort(key=lambda tc: (tc[1].file, tc[1].offset))
    coalesce = getattr(reader, "coalesce_reads", False)
    groups = _windows(tasks) if coalesce else [[task] for task in tasks]

    def run(group: list[tuple[_Target, Chunk]]) -> None:
        source = _WindowReader.fetch(reader, group) if len(group) > 1 else reader
        for t, c in group:
            _read_chunk_part(source, t, c, meta, verify)

    if read_threads > 1 and len(groups) > 1:
        with ThreadPoolExecutor(read_threads, thread_name_prefix="async_ckpt-read") as pool:
            for f in [pool.submit(run, g) for g in groups]:
                f.result()
    else:
        for g in groups:
            run(g)
    for dest, scratch in staged:  # every read is verified: now fill the caller's tensors
        dest.copy_(scratch)
    return targets, replaced


_WINDOW_BYTES = 64 * 1024 * 1024


def _windows(tasks: list[tuple[_Target, Chunk]]) -> list[list[tuple[_Target, Chunk]]]:
    """Runs of back-to-back chunks of one file, up to 64 MiB each: one request per run.

    Object stores charge per request (latency, and some servers read the whole
    object per ranged GET), so many small tensors are fetched together.
    """
    groups: list[list[tuple[_Target, Chunk]]] = []
    for t, c in tasks:
        last = groups[-1] if groups else None
        if last is not None:
            first, prev = last[0][1], last[-1][1]
            adjacent = prev.file == c.file and c.offset == prev.offset + prev.nbytes
            if adjacent and c.offset + c.nbytes - first.offset <= _WINDOW_BYTES:
                last.append((t, c))
                continue
        groups.append([(t, c)])
    return groups


class _WindowReader:
    """Serves reads that fall inside one prefetched byte range of a data file."""

    def __init__(self, reader: StorageReader, name: str, start: int, data: memoryview) -> None:
        self.reader, self.name, self.start, self.data = reader, name, start, data
        self.checkpoint_id = reader.checkpoint_id

    @classmethod
    def fetch(cls, reader: StorageReader, group: list[tuple[_Target, Chunk]]) -> _WindowReader:
        first, last = group[0][1], group[-1][1]
        buf = torch.empty(last.offset + last.nbytes - first.offset, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        reader.read_into(first.file, first.offset, view)
        return cls(reader, first.file, first.offset, view)

    def read_into(self, name: str, offset: int, dest: memoryview) -> None:
        view = dest.cast("B") if dest.format != "B" else dest
        lo = offset - self.start
        if name != self.name or lo < 0 or lo + len(view) > len(self.data):
            self.reader.read_into(name, offset, dest)
            return
        view[:] = self.data[lo : lo + len(view)]


def _raise_if_replaced(reader: StorageReader, meta: Metadata, exc: Exception) -> None:
    """A load that lost its files to a save overwriting the checkpoint says so."""
    try:
        now = decode_metadata(reader.read_metadata()).save_id
    except Exception:
        return
    if now != meta.save_id:
        raise CheckpointReplacedError(
            f"checkpoint {reader.checkpoint_id!r} was overwritten by a newer save while it was "
            f"being loaded ({exc}); nothing stored was damaged. Load it again."
        ) from exc


def run_load(
    state_dict: Mapping[str, Any],
    reader: StorageReader,
    *,
    strict: bool = True,
    verify: bool = True,
    read_threads: int = DEFAULT_READ_THREADS,
    allow_lossy_cast: bool = False,
    verify_first: bool = False,
) -> LoadResult:
    """Fill ``state_dict`` from the checkpoint ``reader`` reads; see :func:`async_ckpt.load`."""
    meta = decode_metadata(reader.read_metadata())
    flat = flatten(state_dict)
    missing = sorted(k for k in flat.leaves if k not in meta.entries)
    extra = [k for k in meta.entries if k not in flat.leaves]
    # Inside a Stateful object (optimizer, module) the checkpoint is authoritative:
    # entries the fresh object lacks yet (optimizer moments) are created for it.
    adopt = [k for k in extra if _under_stateful(k, flat)]
    unexpected = sorted(k for k in extra if not _under_stateful(k, flat))
    if strict and (missing or unexpected):
        raise KeyMismatchError(
            f"state dict and checkpoint {reader.checkpoint_id!r} disagree: missing from the "
            f"checkpoint: {missing[:20]}{' ...' if len(missing) > 20 else ''}; in the checkpoint "
            f"but not in the state dict: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
            ". Pass strict=False to load the keys present.",
            missing=missing,
            unexpected=unexpected,
        )

    try:
        targets, replaced = _read_all(
            flat, meta, reader, adopt, verify, read_threads, allow_lossy_cast, verify_first
        )
    except CorruptCheckpointError as exc:
        _raise_if_replaced(reader, meta, exc)
        raise
    finally:
        reader.close()

    by_key = {t.key: t.tensor for t in targets}
    bound = len(meta.entries) + len(meta.containers)
    for key, value in replaced.items():
        entry = meta.entries[key]
        if isinstance(entry, TensorEntry):
            value = by_key[key]
            if entry.numpy:
                value = value.numpy()
        # A leaf the caller has goes back where the caller has it; adopted leaves follow the
        # checkpoint's path, with list indices bounded by what the checkpoint holds.
        path = flat.paths.get(key, entry.path)
        set_leaf(flat, path, value, meta.containers, max_index=bound)
    # Deepest first, ties by key: the same order on every rank whatever the dict order
    # (load_state_dict may run collectives, e.g. FSDP's optimizer state).
    order = sorted(flat.stateful.items(), key=lambda kv: (-len(kv[0]), kv[0]))
    for prefix, (obj, obj_state) in order:
        try:
            obj.load_state_dict(obj_state)
        except Exception as exc:
            raise StateDictError(
                f"{type(obj).__qualname__} at {prefix!r} rejected the loaded state: {exc}"
            ) from exc
    return LoadResult(missing_keys=missing, unexpected_keys=unexpected)


__all__ = ["LoadResult", "key_of", "run_load", "verify_blocks"]
