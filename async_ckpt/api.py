"""The public entry points: ``save``, ``async_save``, ``load`` and ``assert_same_keys``.

Keyword names follow torch.distributed.checkpoint, so moving from DCP is an
import change. Wiring only: ``async_save`` hands the state to a shared
:class:`~async_ckpt.executor.AsyncCheckpointer`, ``save`` and ``load`` run the
pipeline on the caller's thread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from .dist.ranks import caller_comm
from .executor import AsyncCheckpointer, SaveFuture
from .format.metadata import Metadata
from .pipeline.load import LoadResult, run_load
from .pipeline.save import run_save
from .pipeline.waves import memory_waves
from .planning.plan import Planner, check_same_keys
from .staging import Stager
from .state.describe import describe
from .state.flatten import flatten
from .storage.base import StorageReader, StorageWriter
from .storage.detect import detect_reader, detect_writer

CheckpointId = str | os.PathLike


def save(
    state_dict: Mapping[str, Any],
    *,
    checkpoint_id: CheckpointId | None = None,
    storage_writer: StorageWriter | None = None,
    process_group: Any = None,
    no_dist: bool = False,
) -> Metadata:
    """Save ``state_dict`` synchronously and return the committed checkpoint's metadata.

    Contiguous CPU tensors are written straight from their memory (no copy);
    others are made contiguous on the CPU first. With an initialized
    torch.distributed group every rank calls ``save`` with the same
    ``checkpoint_id``; ``no_dist=True`` saves this process's state alone.
    """
    writer = storage_writer or detect_writer(checkpoint_id)
    state, tensors = describe(flatten(state_dict))
    waves = memory_waves(state, tensors)
    return run_save(state, waves, writer, caller_comm(process_group, no_dist), Planner())


_DEFAULT: dict[tuple, AsyncCheckpointer] = {}


def async_save(
    state_dict: Mapping[str, Any],
    *,
    checkpoint_id: Any = None,
    storage_writer: StorageWriter | None = None,
    process_group: Any = None,
    no_dist: bool = False,
    executor: Literal["process", "thread"] = "process",
    stager: Stager | None = None,
) -> SaveFuture:
    """Save ``state_dict`` in the background; returns once the state is staged.

    Uses one module-wide :class:`AsyncCheckpointer` per (executor, group,
    stager), so repeated calls reuse the same worker and staging memory. Await
    the returned future before the next save of the same state.
    """
    key = (executor, id(process_group), no_dist, id(stager))
    ckpt = _DEFAULT.get(key)
    if ckpt is None or ckpt._closed:
        ckpt = AsyncCheckpointer(
            executor=executor, stager=stager, process_group=process_group, no_dist=no_dist
        )
        _DEFAULT[key] = ckpt
    return ckpt.save(state_dict, checkpoint_id=checkpoint_id, storage_writer=storage_writer)


def close_async_saves() -> None:
    """Finish pending ``async_save`` calls and stop their shared workers and buffers.

    ``async_save`` keeps one checkpointer per configuration for the life of the
    process (they also close at exit). Call this to free that memory early; a
    later ``async_save`` starts a fresh one.
    """
    while _DEFAULT:
        _, ckpt = _DEFAULT.popitem()
        ckpt.close()


def load(
    state_dict: Mapping[str, Any],
    *,
    checkpoint_id: CheckpointId | None = None,
    storage_reader: StorageReader | None = None,
    process_group: Any = None,
    no_dist: bool = False,
    strict: bool = True,
    verify: bool = True,
    allow_lossy_cast: bool = False,
    verify_first: bool = False,
) -> LoadResult:
    """Fill ``state_dict`` in place from a checkpoint; returns the keys that did not match.

    Tensors are copied into the caller's tensors (keeping device and dtype),
    other leaves are replaced, and objects with ``load_state_dict`` get it
    called. Checksums are verified unless ``verify=False``. ``strict=False``
    loads the keys present and reports the rest in the result. A tensor whose
    dtype differs from the stored one is filled only when the cast is lossless
    (float32 into float64, ...); ``allow_lossy_cast=True`` allows any cast
    (float32 into bfloat16, ...).

    A load that fails (a checksum mismatch, a missing file) changes no
    non-tensor leaf and calls no ``load_state_dict``, but may have filled some
    of the caller's tensors already. ``verify_first=True`` reads and verifies
    everything into scratch memory first (as much extra CPU memory as the
    tensors loaded) and fills the caller's tensors only once all of it checked
    out: all or nothing. Every rank reads
    what its own tensors (or DTensor shards) need, so loading reshards freely;
    ``process_group``/``no_dist`` are accepted for DCP compatibility.
    """
    del process_group, no_dist  # loading needs no collectives
    reader = storage_reader or detect_reader(checkpoint_id)
    return run_load(
        state_dict,
        reader,
        strict=strict,
        verify=verify,
        allow_lossy_cast=allow_lossy_cast,
        verify_first=verify_first,
    )


def assert_same_keys(state_dict: Mapping[str, Any], process_group: Any = None) -> None:
    """Raise :class:`RankMismatchError` (an AssertionError) unless all ranks have the same keys.

    Costs one small collective on a fingerprint when ranks agree; the per-rank
    key diff is gathered only on mismatch. Returns at once on a single rank.
    """
    comm = caller_comm(process_group, no_dist=False)
    if comm.world_size == 1:
        return
    state, _ = describe(flatten(state_dict))
    check_same_keys(state, comm)
