"""Load a checkpoint into the caller's state dict, in place, verifying checksums.

Tensors are filled in place (device and dtype of the caller's tensor kept);
other leaves are replaced. A caller's tensor may cover any region of the
stored tensor (a DTensor shard): only the stored chunks that overlap it are
read, and of those only the rows needed, rounded out to checksum blocks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..dist.comm import Comm, LocalComm
from ..errors import (
    CheckpointReplacedError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    LoadFailedError,
    SaveFailedError,
    StateDictError,
)
from ..format.checksum import block_checksums
from ..format.decode import decode_metadata
from ..format.dtypes import dtype_from_name, itemsize
from ..format.metadata import Chunk, Metadata, TensorEntry
from ..format.objects import loads_object
from ..planning.keys import KeyCheck, check_keys
from ..planning.read_plan import (
    ReadPlan,
    Target,
    match_keys,
    overlap,
    plan_reads,
    read_groups,
)
from ..state.flatten import flatten, set_leaf
from ..state.local_view import local_view
from ..storage.base import StorageReader, checkpoint_metadata
from ..threads import run_jobs
from .device_copy import DeviceCopies
from .progress import byte_bar
from .read_jobs import TINY_CHUNK_BYTES, WindowReader, read_jobs

DEFAULT_READ_THREADS = 4


@dataclass
class LoadResult:
    """What a load did not match: keys the caller asked for but the checkpoint lacks,
    and keys the checkpoint holds that the caller's state dict has no place for."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


def verify_blocks(
    data: memoryview, chunk: Chunk, first_block: int, block_size: int, key: str
) -> None:
    """Check ``data`` (blocks ``first_block``.. of ``chunk``) against the stored checksums.

    A chunk without checksums is one read from a foreign format (a DCP checkpoint
    stores none); our own decoder requires one per block, so this cannot skip them.
    """
    if not chunk.checksums:
        return
    for n, crc in enumerate(block_checksums(data, block_size)):
        if crc != chunk.checksums[first_block + n]:
            start = chunk.offset + (first_block + n) * block_size
            raise ChecksumMismatchError(
                f"checksum mismatch in tensor {key!r}: data file {chunk.file!r}, bytes from "
                f"{start}; the checkpoint is corrupted. Load an earlier checkpoint, or pass "
                "verify=False to load the damaged data anyway."
            )


def _read_chunk_part(
    reader: StorageReader,
    target: Target,
    chunk: Chunk,
    meta: Metadata,
    verify: bool,
    copies: DeviceCopies,
) -> None:
    """Copy the part of ``chunk`` that overlaps ``target`` into the target tensor."""
    entry, dest = target.entry, target.tensor
    ov = overlap(chunk.offsets, chunk.sizes, target.offsets, tuple(dest.shape))
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
    buf = copies.buffer(end - start, dest)
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
        copies.copy(dest[dst_index], src)
    else:
        copies.copy(dest, src)


def _new_tensor(entry: TensorEntry) -> torch.Tensor:
    # zeros, not empty: never hand back leftover process memory, whatever the metadata says
    return torch.zeros(entry.shape, dtype=dtype_from_name(entry.dtype))


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
    plan: ReadPlan,
    meta: Metadata,
    reader: StorageReader,
    verify: bool,
    read_threads: int,
    verify_first: bool = False,
    progress: bool = False,
) -> tuple[list[Target], dict[str, Any]]:
    """Execute ``plan``; returns the tensor targets and the leaves to set."""
    _check_file_sizes(plan.files, meta, reader)
    targets = list(plan.targets)
    replaced = dict(plan.replaced)
    # verify_first: read and verify into scratch tensors, touch the caller's only after
    staged: list[tuple[torch.Tensor, torch.Tensor]] = []
    if verify_first:
        for n, t in enumerate(targets):
            scratch = torch.empty(tuple(t.tensor.shape), dtype=t.tensor.dtype)
            staged.append((t.tensor, scratch))
            targets[n] = Target(t.key, scratch, t.offsets, t.entry)
    for key, entry in plan.fresh:
        tensor = _new_tensor(entry)
        targets.append(Target(key, tensor, (0,) * tensor.dim(), entry))
        replaced[key] = tensor
    for key, entry in plan.objects:
        buf = bytearray(entry.nbytes)
        reader.read_into(entry.file, entry.offset, memoryview(buf))
        if verify:
            chunk = Chunk((), (), entry.file, entry.offset, entry.nbytes, entry.checksums)
            verify_blocks(memoryview(buf), chunk, 0, meta.block_size, key)
        replaced[key] = loads_object(bytes(buf))

    groups = read_groups(targets, reader.coalesce_reads)
    copies = DeviceCopies([t.tensor for t in targets])

    bar = byte_bar(
        sum(c.nbytes for g in groups for _, c in g), f"load {reader.checkpoint_id}", progress
    )

    def run(job: list[list[tuple[Target, Chunk]]]) -> None:
        for group in job:
            source = WindowReader.fetch(reader, group) if len(group) > 1 else reader
            for t, c in group:
                _read_chunk_part(source, t, c, meta, verify, copies)
            bar.update(sum(c.nbytes for _, c in group))  # tqdm serialises the threads' updates

    # Reads of tiny chunks are Python-bound: reader threads would only contend for the
    # GIL over them (measured: 4 threads took 5x one at 100k tensors of 64 bytes). They
    # run here, while the threads read the others.
    tiny = [g for g in groups if max(c.nbytes for _, c in g) <= TINY_CHUNK_BYTES]
    rest = [g for g in groups if max(c.nbytes for _, c in g) > TINY_CHUNK_BYTES]
    with bar, _finishing(copies):
        jobs = read_jobs(rest, read_threads)
        if read_threads > 1 and len(jobs) > 1:
            # plain threads: a load from an atexit handler works (see async_ckpt.threads)
            run_jobs(run, jobs, read_threads, "async_ckpt-read", here=lambda: run(tiny))
        else:
            run(tiny)
            for j in jobs:
                run(j)
    for dest, scratch in staged:  # every read is verified: now fill the caller's tensors
        dest.copy_(scratch)
    return targets, replaced


@contextlib.contextmanager
def _finishing(copies: DeviceCopies) -> Iterator[None]:
    """Wait for the queued host-to-device copies, also when a read failed (their
    buffers and the caller's tensors must not be in flight when the load returns)."""
    try:
        yield
    finally:
        copies.finish()


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


def _agree(comm: Comm, error: Exception | None, what: str, checkpoint_id: str) -> None:
    """Every rank learns whether all ranks got through ``what``; a rank's own error wins.

    One fixed-size collective when all is well; the failures' text travels only
    when some rank failed. Without it a rank that failed would leave the others
    waiting in the next collective (or return early while they still read).
    """
    if comm.world_size > 1:
        text = None if error is None else f"{type(error).__name__}: {error}"
        try:
            flags = comm.all_gather_digests(b"\x01" if error is not None else b"\x00")
            gathered = comm.all_gather_object(text) if any(f != b"\x00" for f in flags) else []
        except SaveFailedError as exc:  # a peer died or timed out: the comm says so
            raise LoadFailedError(f"loading {checkpoint_id!r}: {exc}") from (error or exc)
        if gathered:
            failures = {rank: reason for rank, reason in enumerate(gathered) if reason is not None}
            if error is None:
                raise LoadFailedError(
                    f"loading {checkpoint_id!r} failed on rank(s) {sorted(failures)} while "
                    f"{what}: " + "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items())),
                    failures=failures,
                )
    if error is not None:
        raise error


def run_load(
    state_dict: Mapping[str, Any],
    reader: StorageReader,
    *,
    strict: KeyCheck = True,
    verify: bool = True,
    read_threads: int = DEFAULT_READ_THREADS,
    allow_lossy_cast: bool = False,
    verify_first: bool = False,
    metadata: Metadata | None = None,
    comm: Comm | None = None,
    progress: bool = False,
    local: bool = False,
) -> LoadResult:
    """Fill ``state_dict`` from the checkpoint ``reader`` reads; see :func:`async_ckpt.load`.

    ``metadata``: the checkpoint's, when the caller has decoded it already.
    ``comm``: the caller's ranks, which load together (None: this process alone).
    ``local``: fill the local tensors of distributed leaves from a checkpoint of
    this rank alone (:mod:`async_ckpt.state.local_view`).
    """
    comm = comm or LocalComm()
    cid = reader.checkpoint_id
    try:
        error: Exception | None = None
        try:  # planning: every rank learns of a key or shape error on any rank
            meta = metadata or checkpoint_metadata(reader)
            flat = flatten(state_dict)
            if local:
                flat = local_view(flat)
            keys = match_keys(flat, meta)
            check_keys(keys, strict, cid)
            plan = plan_reads(flat, meta, keys.adopt, allow_lossy_cast=allow_lossy_cast)
        except Exception as exc:
            error = exc
        _agree(comm, error, "planning the load", cid)
        try:  # reading: DCP's load is collective; code may delete the checkpoint after it
            targets, replaced = _read_all(
                plan, meta, reader, verify, read_threads, verify_first, progress
            )
        except CorruptCheckpointError as exc:
            try:
                _raise_if_replaced(reader, meta, exc)
            except CheckpointReplacedError as replaced_exc:
                error = replaced_exc
            else:
                error = exc
        except Exception as exc:
            error = exc
        _agree(comm, error, "reading", cid)
    finally:
        reader.close()

    by_key = {t.key: t.tensor for t in targets}
    bound = len(meta.entries) + len(meta.containers)
    for key, value in replaced.items():
        entry = meta.entries[key]
        if isinstance(entry, TensorEntry):
            if value is None:  # else a tensor the plan made (for a meta-device leaf)
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
    return LoadResult(missing_keys=keys.missing, unexpected_keys=keys.unexpected)


__all__ = ["LoadResult", "run_load", "verify_blocks"]
