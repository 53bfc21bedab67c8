"""The public entry points: ``save``, ``async_save``, ``load``, ``delete``, ``assert_same_keys``.

Also DCP's deprecated ``save_state_dict``/``load_state_dict`` names.

Keyword names follow torch.distributed.checkpoint, so moving from DCP is an
import change. Wiring only: ``async_save`` hands the state to a shared
:class:`~async_ckpt.executor.AsyncCheckpointer`, ``save`` and ``load`` run the
pipeline on the caller's thread.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from . import dcp_compat
from .dist.ranks import caller_comm
from .errors import SaveInProgressError
from .executor import AsyncCheckpointer, SaveFuture, inflight
from .format.metadata import Metadata
from .gc_pause import gc_paused
from .pipeline.incremental import incremental_save
from .pipeline.load import LoadResult, run_load
from .pipeline.save import run_save
from .pipeline.waves import memory_waves
from .planning.keys import KeyCheck
from .planning.plan import Planner, check_same_keys
from .staging import Stager
from .state.describe import describe
from .state.flatten import flatten
from .storage.base import StorageReader, StorageWriter
from .storage.dcp_options import warn_no_effect
from .storage.detect import detect_reader, detect_root, detect_writer

CheckpointId = str | os.PathLike


def save(
    state_dict: Mapping[str, Any],
    *,
    checkpoint_id: CheckpointId | None = None,
    storage_writer: StorageWriter | None = None,
    planner: Any = None,
    process_group: Any = None,
    no_dist: bool = False,
    use_collectives: bool = True,
    incremental: bool = False,
    base: CheckpointId | None = None,
) -> Metadata:
    """Save ``state_dict`` synchronously and return the committed checkpoint's metadata.

    Contiguous CPU tensors are written straight from their memory (no copy),
    except small ones, packed into one buffer per dtype (up to 256 MiB in all);
    others are made contiguous on the CPU first. With an initialized
    torch.distributed group every rank calls ``save`` with the same
    ``checkpoint_id``; ``no_dist=True`` saves this process's state alone.
    ``planner`` (None or a default planner) and ``use_collectives`` are
    torch.distributed.checkpoint's keywords (docs/migrating-from-dcp.md).
    ``base`` / ``incremental``: as for :func:`async_save`.
    """
    dcp_compat.check_save_planner(planner)
    dcp_compat.check_writer(storage_writer)
    _check_use_collectives(use_collectives)
    spec = incremental_save(incremental, base)
    writer = storage_writer or detect_writer(checkpoint_id)
    # A big state's save makes objects per tensor, none in cycles: collections would
    # re-traverse the heap for nothing (as in the worker, see gc_pause). The state is
    # described before this rank checks in, so that a bad state fails here, alone.
    with gc_paused():
        state, tensors = describe(flatten(state_dict))
        waves = memory_waves(state, tensors)
        comm = caller_comm(process_group, no_dist, "async_ckpt.save")
        return run_save(state, waves, writer, comm, Planner(), incremental=spec)


def _check_use_collectives(use_collectives: bool) -> None:
    if not use_collectives:
        warn_no_effect(
            "use_collectives=False",
            "every save validates keys and plans across ranks with one small collective "
            "(pass no_dist=True to save one process's state alone)",
        )


_DEFAULT: dict[tuple, AsyncCheckpointer] = {}


def async_save(
    state_dict: Mapping[str, Any],
    *,
    checkpoint_id: Any = None,
    storage_writer: StorageWriter | None = None,
    planner: Any = None,
    process_group: Any = None,
    async_checkpointer_type: Any = None,
    async_stager: Any = None,
    no_dist: bool = False,
    use_collectives: bool = True,
    executor: Literal["process", "thread"] | None = None,
    stager: Stager | None = None,
    incremental: bool = False,
    base: CheckpointId | None = None,
) -> SaveFuture:
    """Save ``state_dict`` in the background; returns a :class:`SaveFuture` once it is staged.

    The state (tensors on any device, nested dicts/lists, ``Stateful`` objects
    such as modules and optimizers, plain values) is copied into reused
    shared memory; a worker then validates keys across ranks, writes and
    commits atomically while training goes on. ``future.result()`` returns the
    committed :class:`Metadata` or raises the save's error
    (:class:`SaveFailedError` and its subclasses); ``await future`` works in
    asyncio code.

    Lifetime: the first call starts one :class:`AsyncCheckpointer` (a worker
    process and a staging buffer the size of the state) per executor and
    process group, reused by every later call and closed at interpreter exit
    or by :func:`close_async_saves`. You need not await a save before the
    next one: the next call waits for the staging buffer to be free (the
    previous snapshot handed over), and the worker commits saves in order.
    Await the last future before you rely on the checkpoint (or exit).
    You may change the state as soon as this returns; with
    ``StagerOptions(async_staging=True)`` only after ``future.staged``.

    Arguments:
        checkpoint_id / storage_writer: where to save (storage detected from the
            id: a local path, ``s3://``, ``gs://``, ``memory://`` (thread executor
            only), a plugin's scheme).
        process_group / no_dist: with an initialised group every rank calls this
            with the same id; ``no_dist=True`` saves this process alone (what a
            framework that saves on rank 0 only needs). A call on some ranks only
            raises :class:`RanksMissingError` after ``ASYNC_CKPT_ARRIVAL_TIMEOUT_S``.
        executor: ``"process"`` (default) or ``"thread"``; DCP's
            ``async_checkpointer_type`` (THREAD/PROCESS) chooses the same.
        stager: a :class:`Stager` (its options: buffers, async staging, a memory
            budget); a Stager with the options of the current one reuses it, other
            options replace it after its pending save. DCP's ``async_stager``
            (``DefaultStager(StagingOptions(...))``) maps onto one.
        base: a checkpoint id; the save then writes only the chunks whose bytes
            differ from ``base``'s and shares the rest with it (hard links on a
            local disk, server-side copies on object stores), so every
            checkpoint still stands alone (docs/incremental.md).
        incremental: record the chunk digests that let a later save use this
            checkpoint as its ``base`` (implied by ``base``).
        planner, use_collectives: DCP's keywords (docs/migrating-from-dcp.md).

    Raises at the call: :class:`StateDictError` / :class:`UnsafeObjectError`
    for state that cannot be saved or would not load back,
    :class:`StorageDetectionError` for an id no backend handles, ``TypeError``
    for DCP's own storage classes.
    """
    dcp_compat.check_save_planner(planner)
    dcp_compat.check_writer(storage_writer)
    _check_use_collectives(use_collectives)
    executor = dcp_compat.executor_name(executor, async_checkpointer_type)
    if stager is not None and async_stager is not None:
        raise ValueError("pass stager= or async_stager=, not both")
    stager = stager or dcp_compat.stager_for(async_stager)
    return _shared_checkpointer(executor, process_group, no_dist, stager).save(
        state_dict,
        checkpoint_id=checkpoint_id,
        storage_writer=storage_writer,
        incremental=incremental,
        base=base,
    )


def _shared_checkpointer(
    executor: Literal["process", "thread"], process_group: Any, no_dist: bool, stager: Stager | None
) -> AsyncCheckpointer:
    """The one checkpointer (one worker, one staging buffer) of this configuration.

    A ``stager`` with the options of the current one reuses it, whatever the
    object (a loop that builds ``Stager(...)`` each call must not start a worker
    per call); other options replace it, after its pending save finished.
    """
    key = (executor, id(process_group), no_dist)
    ckpt = _DEFAULT.get(key)
    if ckpt is not None and not ckpt._closed:
        if stager is None or stager is ckpt.stager or stager.options == ckpt.stager.options:
            return ckpt
        ckpt.close()  # waits for its save: one worker at a time, never two
    ckpt = AsyncCheckpointer(
        executor=executor, stager=stager, process_group=process_group, no_dist=no_dist
    )
    _DEFAULT[key] = ckpt
    return ckpt


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
    planner: Any = None,
    process_group: Any = None,
    no_dist: bool = False,
    strict: KeyCheck = True,
    verify: bool = True,
    allow_lossy_cast: bool = False,
    verify_first: bool = False,
    progress: bool = False,
) -> LoadResult:
    """Fill ``state_dict`` in place from a checkpoint; returns the keys that did not match.

    The keys of ``state_dict`` decide what is loaded, as in
    torch.distributed.checkpoint: every one must be in the checkpoint
    (:class:`KeyMismatchError` names those that are not), while keys the
    checkpoint holds beyond them are left alone and listed in
    ``LoadResult.unexpected_keys``. ``strict="exact"`` also refuses those;
    ``strict=False`` (or DCP's ``DefaultLoadPlanner(allow_partial_load=True)``)
    loads the keys present and lists the rest in ``missing_keys``.

    Tensors are copied into the caller's tensors (keeping device and dtype),
    other leaves are replaced, and objects with ``load_state_dict`` get it
    called. Checksums are verified unless ``verify=False``. A tensor whose
    dtype differs from the stored one is filled only when the cast is lossless
    (float32 into float64, ...); ``allow_lossy_cast=True`` allows any cast
    (float32 into bfloat16, ...).

    A load that fails (a checksum mismatch, a missing file) changes no
    non-tensor leaf and calls no ``load_state_dict``, but may have filled some
    of the caller's tensors already. ``verify_first=True`` reads and verifies
    everything into scratch memory first (as much extra CPU memory as the
    tensors loaded) and fills the caller's tensors only once all of it checked
    out: all or nothing.

    Every rank reads what its own tensors (or DTensor shards) need, so loading
    reshards freely. With a process group the load is collective, as DCP's:
    it returns on every rank once all ranks have read (so a checkpoint may be
    deleted right after), and if any rank fails every rank raises
    (:class:`LoadFailedError` on the ranks that did not fail themselves).
    ``no_dist=True`` loads this process alone. A torch.distributed.checkpoint
    directory is read directly (its metadata decoded without running code).
    ``progress=True`` draws a progress bar (bytes read) on stderr.
    """
    partial = dcp_compat.partial_load(planner)
    dcp_compat.check_reader(storage_reader)
    reader = storage_reader or detect_reader(checkpoint_id)
    comm = caller_comm(process_group, no_dist, "async_ckpt.load")
    with gc_paused():  # decoding and placing many entries: see gc_pause
        return run_load(
            state_dict,
            reader,
            strict=False if partial else strict,
            verify=verify,
            allow_lossy_cast=allow_lossy_cast,
            verify_first=verify_first,
            comm=comm,
            progress=progress,
        )


def save_state_dict(
    state_dict: Mapping[str, Any],
    storage_writer: StorageWriter,
    process_group: Any = None,
    coordinator_rank: int = 0,
    no_dist: bool = False,
    planner: Any = None,
) -> Metadata:
    """Deprecated in torch.distributed.checkpoint too: use :func:`save`.

    ``coordinator_rank`` is accepted; rank 0 of the group always commits.
    """
    warnings.warn(
        "save_state_dict is deprecated (as in torch.distributed.checkpoint); use save()",
        FutureWarning,
        stacklevel=2,
    )
    del coordinator_rank
    return save(
        state_dict,
        storage_writer=storage_writer,
        planner=planner,
        process_group=process_group,
        no_dist=no_dist,
    )


def load_state_dict(
    state_dict: Mapping[str, Any],
    storage_reader: StorageReader,
    process_group: Any = None,
    coordinator_rank: int = 0,
    no_dist: bool = False,
    planner: Any = None,
) -> LoadResult:
    """Deprecated in torch.distributed.checkpoint too: use :func:`load`."""
    warnings.warn(
        "load_state_dict is deprecated (as in torch.distributed.checkpoint); use load()",
        FutureWarning,
        stacklevel=2,
    )
    del coordinator_rank
    return load(
        state_dict,
        storage_reader=storage_reader,
        planner=planner,
        process_group=process_group,
        no_dist=no_dist,
    )


def delete(checkpoint_id: CheckpointId, *, recent_s: float = 60.0, force: bool = False) -> None:
    """Delete a checkpoint: its metadata first (so a crash midway leaves it incomplete,
    never half-loadable), then its data files.

    Refuses with :class:`SaveInProgressError` while a save of this process
    writes ``checkpoint_id``, and, unless ``force``, an uncommitted checkpoint
    whose files changed in the last ``recent_s`` seconds: another process is
    probably writing it. (A save by another process overwriting a committed
    checkpoint cannot be told from here: make deletes and saves of one id come
    from one place, as ``CheckpointManager`` does.) A checkpoint already gone is
    no error.
    """
    if inflight.is_writing(checkpoint_id):
        raise SaveInProgressError(
            f"checkpoint {os.fspath(checkpoint_id)!r} is being written by a save of this "
            "process; wait for its future before deleting it"
        )
    text = os.fspath(checkpoint_id).rstrip("/")
    parent, _, name = text.rpartition("/")
    if not name or name in (".", ".."):
        raise ValueError(f"cannot delete {text!r}: name a checkpoint, not a root")
    root = detect_root(parent or ".")
    committed = root.children().get(name)
    if committed is None:
        return
    if not committed and not force:
        mtime = root.usage(name).mtime
        if mtime is not None and time.time() - mtime < recent_s:
            raise SaveInProgressError(
                f"checkpoint {text!r} is not committed and its files changed "
                f"{time.time() - mtime:.0f} s ago: a save may still be writing it. "
                "Pass force=True to delete it anyway."
            )
    root.delete(name)


def assert_same_keys(state_dict: Mapping[str, Any], process_group: Any = None) -> None:
    """Raise :class:`RankMismatchError` (an AssertionError) unless all ranks have the same keys.

    Costs one small collective on a fingerprint when ranks agree; the per-rank
    key diff is gathered only on mismatch. Returns at once on a single rank.
    """
    comm = caller_comm(process_group, no_dist=False, what="async_ckpt.assert_same_keys")
    if comm.world_size == 1:
        return
    state, _ = describe(flatten(state_dict))
    check_same_keys(state, comm)
