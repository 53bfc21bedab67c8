"""CheckpointManager: periodic asynchronous saves under one root, retention, resume.

One checkpoint per step lives at ``<root>/step-<step:08d>``; a step counts once
its save committed (its ``metadata.json`` exists). The manager keeps at most
one save in flight, deletes old checkpoints after each commit, removes what a
crash left behind when it starts (once it is older than a grace period: it may
be a save another process is still writing), and restores the newest committed
step. Restoring never needs write access to the root.

With ``keep_best`` it also keeps the checkpoints with the best metric (the
metrics are stored in each checkpoint's metadata, so a new manager reads them
back); with ``save_on_preemption`` a signal makes the next ``maybe_save`` take a
final save, agreed by all ranks (:mod:`.preemption`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, Literal

from ..errors import CheckpointError
from ..executor import AsyncCheckpointer, SaveFuture
from ..planning.keys import KeyCheck
from ..storage.detect import detect_writer
from .memory_restore import RestoreInfo
from .memory_store import default_memory_root
from .memory_tier import MemoryTier
from .metrics import StepMetrics
from .options import check_memory, check_metric, check_step, env_ranks_per_node, grace, positive
from .preemption import Preemption, preemption_signals
from .restore import restore_step
from .retention import Policy, in_flight, remove_incomplete, remove_unkept
from .root import StepStore
from .saves import SaveTracker

log = logging.getLogger("async_ckpt")


def _group_rank(checkpointer: AsyncCheckpointer) -> int:
    if not checkpointer.distributed:
        return 0
    import torch.distributed as dist

    return dist.get_rank(checkpointer.process_group)


class CheckpointManager:
    """Saves a training state every ``save_every`` steps and keeps the recent ones.

    Checkpoints go to ``<root>/step-<step:08d>`` (a local path or an fsspec
    URL). After each commit the ``keep_last`` newest committed steps are kept
    (``None``: all), plus every step divisible by ``keep_every``; the newest
    committed step is never deleted, whatever a later save does.

    On start, rank 0 removes step directories without metadata (a crash's
    leftovers) with a warning, but only those whose newest file was modified
    more than ``incomplete_grace_s`` seconds ago (default
    :data:`INCOMPLETE_GRACE_S`, 10 minutes, or the environment variable
    ``ASYNC_CKPT_INCOMPLETE_GRACE_S``): a younger one may be a save another live
    process is still writing (an orphaned worker of a killed job, another job),
    and is kept with a warning. A clean-up that fails (a read-only root) is a
    warning too, never an error: ``restore()`` needs no write access.

    **Best checkpoints.** ``save(step, state, metrics={"loss": 0.12})`` stores the
    metrics (finite numbers and strings) in the checkpoint's metadata. With
    ``keep_best=k`` and ``metric="loss"``, retention also keeps the ``k``
    committed steps with the lowest (``mode="min"``) or highest (``"max"``)
    value of that metric; steps saved without it are never among the best.
    :meth:`best_step` returns the best committed step (``metric`` alone, without
    ``keep_best``, enables it without changing retention).

    **Preemption.** With ``save_on_preemption=True`` (SIGTERM) or a tuple of
    signals, a signal only records the request; the next :meth:`maybe_save`
    finishes the save in flight and saves its step whatever the interval, then
    :attr:`preempted` is true: leave the training loop and close the manager,
    which waits for that save to commit. The handlers it replaced are called
    too (Python functions only) and put back by ``close()``. With several ranks
    every ``maybe_save`` all-reduces the flag over a small gloo group of the
    manager's own, read one step later so that training never waits for it:
    all ranks take the final save at the same step, the one after the first
    rank saw the signal. ``preemption_check_every=N`` checks only at steps
    divisible by N (each check's all-reduce then has N steps to finish, and
    the final save comes up to 2N steps after the signal): for short steps on
    many ranks.

    **Incremental.** With ``incremental=True`` each save shares the chunks whose
    bytes equal the newest committed step's (frozen layers, optimizer state
    of frozen parameters, untouched embedding rows) instead of writing them
    again; every step directory still stands alone, so retention and
    ``rm -r`` of any step never break another (docs/incremental.md).

    **Memory tier.** With ``memory_every=N`` (at most ``save_every``) every N-th
    step is also snapshotted into the node's shared memory (``memory_root``,
    default under ``/dev/shm``), committed and checksummed, and copied to the
    same local rank on the next node (``ranks_per_node``, default torchrun's
    ``LOCAL_WORLD_SIZE``); ``memory_keep`` snapshots are kept. :meth:`restore`
    then restores the newest step every rank can get from memory (own copy or a
    peer's replica) when it is at least as new as storage's, and reports where
    it came from in :attr:`last_restore` (docs/memory-tier.md).

    ``storage_options`` go to the fsspec backend of an object-store root
    (credentials, endpoint, ...), for its listing, saves and loads.

    Saves run on an :class:`AsyncCheckpointer` built from ``executor``,
    ``process_group``, ``no_dist`` and ``checkpointer_kwargs`` (``on_saved``,
    ``stager``, ``timeout``...), or on ``checkpointer`` if given.

    Call its methods from the training thread. In a multi-rank job create it on
    every rank at the same point and call ``save``/``maybe_save`` on every rank
    with the same step; only rank 0 of the group deletes anything.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        save_every: int | None = None,
        executor: Literal["process", "thread"] = "process",
        process_group: Any = None,
        no_dist: bool = False,
        checkpointer: AsyncCheckpointer | None = None,
        incomplete_grace_s: float | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: Literal["min", "max"] = "min",
        save_on_preemption: bool | int | tuple[int, ...] = False,
        preemption_check_every: int = 1,
        storage_options: dict[str, Any] | None = None,
        incremental: bool = False,
        memory_every: int | None = None,
        memory_root: str | os.PathLike | None = None,
        memory_keep: int = 2,
        ranks_per_node: int | None = None,
        **checkpointer_kwargs: Any,
    ) -> None:
        self.incremental = bool(incremental)
        self.memory_every = positive("memory_every", memory_every)
        check_memory(self.memory_every, save_every, memory_keep, ranks_per_node)
        self.incomplete_grace_s = grace(incomplete_grace_s)
        self.keep_last = positive("keep_last", keep_last)
        self.keep_every = positive("keep_every", keep_every)
        self.save_every = positive("save_every", save_every)
        self.keep_best = positive("keep_best", keep_best)
        self.metric = check_metric(metric, mode, self.keep_best)
        self.mode = mode
        if preemption_check_every is None:
            raise CheckpointError("preemption_check_every must be a positive integer, not None")
        positive("preemption_check_every", preemption_check_every)  # raises unless >= 1
        self.preemption_check_every = preemption_check_every
        signals = preemption_signals(save_on_preemption)
        preemption = Preemption(signals) if signals else None
        self.storage_options = storage_options
        self.store = StepStore(root, storage_options)
        self.root = self.store.root
        self._metrics = StepMetrics(self.store, self.metric, self.mode, self.keep_best)
        if checkpointer is None:
            checkpointer = AsyncCheckpointer(
                executor=executor,
                process_group=process_group,
                no_dist=no_dist,
                **checkpointer_kwargs,
            )
            self._owns_checkpointer = True
        else:
            if checkpointer_kwargs:
                raise CheckpointError(
                    f"pass either checkpointer= or options for a new one "
                    f"({sorted(checkpointer_kwargs)}), not both"
                )
            self._owns_checkpointer = False
            try:
                checkpointer.wait()  # its last save may target this root: let it finish first
            except Exception:  # already logged by the checkpointer
                pass
        self.checkpointer = checkpointer
        self.rank = _group_rank(checkpointer)
        self.memory_root: str | None = None
        self._memory: MemoryTier | None = None
        if self.memory_every is not None:
            self.memory_root = os.fspath(memory_root or default_memory_root(self.root))
            try:
                self._memory = MemoryTier(
                    self.memory_root,
                    keep=memory_keep,
                    ranks_per_node=ranks_per_node or env_ranks_per_node(),
                    executor=executor,
                    stager_options=checkpointer.stager.options,
                    process_group=checkpointer.process_group,
                    distributed=checkpointer.distributed,
                    group_timeout=checkpointer.group_timeout,
                )
            except BaseException:
                if self._owns_checkpointer:
                    checkpointer.close()
                raise
        self.last_restore: RestoreInfo | None = None
        self._lock = threading.RLock()
        self._saves = SaveTracker(self.store, self._metrics, self._lock, self._retain_logged)
        self._last_step: int | None = None  # saved or restored last: maybe_save skips it
        self._closed = False
        self._preemption = preemption
        if preemption is not None:
            try:  # a collective on several ranks: here, where every rank is
                preemption.start(
                    checkpointer.process_group,
                    checkpointer.distributed,
                    checkpointer.group_timeout,
                )
            except BaseException:
                if self._memory is not None:
                    self._memory.close()
                if self._owns_checkpointer:
                    checkpointer.close()
                raise
        if self.rank == 0:
            try:
                remove_incomplete(self.store, self.incomplete_grace_s)
            except Exception as exc:  # e.g. a root we may read but not list or change
                log.warning(
                    "clean-up of incomplete checkpoints under %s failed: %s", self.root, exc
                )

    # ------------------------------------------------------------------- queries
    def steps(self) -> list[int]:
        """The committed steps under the root, oldest first."""
        return self.store.committed()

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    def checkpoint_id(self, step: int) -> str:
        """Where ``step`` is (or would be) saved."""
        return self.store.checkpoint_id(check_step(step))

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics committed step ``step`` was saved with; None if it has none.

        Read from its metadata once, then remembered.
        """
        check_step(step)
        with self._lock:
            try:
                return self._metrics.of(step)
            except CheckpointError:
                if step not in self.store.committed():
                    return None
                raise

    def best_step(self) -> int | None:
        """The committed step with the best ``metric`` (lowest for ``mode="min"``,
        highest for ``"max"``; the newer of equals), or None when no committed
        step has it. A save still in flight is not considered (``wait()`` first)."""
        if self.metric is None:
            raise CheckpointError(
                "best_step needs the metric to rank by: CheckpointManager(metric='loss', "
                "mode='min'), and save(step, state, metrics={'loss': ...})"
            )
        committed = self.store.committed()
        with self._lock:
            best = self._metrics.best(committed, 1)
        return best[0] if best else None

    # ---------------------------------------------------------------- preemption
    @property
    def preempted(self) -> bool:
        """True once a preemption was agreed and its final save taken: stop training,
        then close the manager (it waits for that save to commit)."""
        return self.preemption_step is not None

    @property
    def preemption_step(self) -> int | None:
        """The step of the final save a preemption asked for (None before)."""
        return self._preemption.step if self._preemption is not None else None

    @property
    def preemption_signal(self) -> int | None:
        """The signal that reached this process (None if none did; with several ranks
        another rank's signal may be what :attr:`preempted` follows)."""
        return self._preemption.watcher.received if self._preemption is not None else None

    def request_preemption(self) -> None:
        """Ask for the final save as a signal would (from a scheduler's notice, say).

        Only records the request; the next :meth:`maybe_save` acts on it. Needs
        ``save_on_preemption``, so that the ranks agree on it at every step.
        """
        if self._preemption is None:
            raise CheckpointError(
                "request_preemption needs CheckpointManager(save_on_preemption=True), so that "
                "maybe_save checks (and the ranks agree on) the request"
            )
        self._preemption.watcher.request()

    # --------------------------------------------------------------------- saves
    def maybe_save(
        self, step: int, state: Mapping[str, Any], metrics: Mapping[str, Any] | None = None
    ) -> SaveFuture | None:
        """Save ``state`` as ``step`` if ``step`` is a multiple of ``save_every``,
        or as the final save once preemption was requested.

        Returns the save's future, or None when this step is not saved (also
        when this manager just saved or restored this very step). ``metrics``
        are stored with the save (see :meth:`save`) and checked only when it
        saves. With ``save_on_preemption`` call it on every rank at every step:
        that is where the ranks agree on the preemption.
        """
        if self.save_every is None and self._preemption is None and self._memory is None:
            raise CheckpointError(
                "maybe_save needs CheckpointManager(save_every=N); or call save(step, state)"
            )
        check_step(step)
        preemption = self._preemption
        every = self.preemption_check_every
        if preemption is not None and not self._closed and preemption.agreed(step, every):
            return self._final_save(step, state, metrics)
        if step == self._last_step:
            return None
        memory = None
        if self.memory_every is not None and step % self.memory_every == 0:
            memory = self.save_to_memory(step, state)
        if self.save_every is None or step % self.save_every != 0:
            return memory
        return self.save(step, state, metrics)

    def save_to_memory(self, step: int, state: Mapping[str, Any]) -> SaveFuture:
        """Snapshot ``state`` as ``step`` in the memory tier (``memory_every``), returning
        once it is staged; the snapshot is then written to shared memory and sent to
        a peer on another node (docs/memory-tier.md). Waits first for the previous
        memory snapshot. :meth:`maybe_save` calls it every ``memory_every`` steps."""
        self._check_open()
        step = check_step(step)
        if self._memory is None:
            raise CheckpointError("save_to_memory needs CheckpointManager(memory_every=N)")
        return self._memory.save(step, state)

    def _final_save(
        self, step: int, state: Mapping[str, Any], metrics: Mapping[str, Any] | None
    ) -> SaveFuture | None:
        """Preemption was agreed: finish the save in flight, then save ``step`` (once)."""
        assert self._preemption is not None
        self._preemption.step = step
        log.warning(
            "preemption requested (%s): %s step %d as the final checkpoint under %s",
            self._preemption.reason(),
            "already saved" if step == self._last_step else "saving",
            step,
            self.root,
        )
        pending, pending_step = self._saves.pending()
        if step == self._last_step:
            return pending if pending_step == step else None
        try:
            self._saves.collect(None)
        except Exception as exc:  # logged by the checkpointer too; the final save matters more
            log.warning(
                "the save before the final one failed (%s); saving step %d anyway", exc, step
            )
        return self.save(step, state, metrics)

    def save(
        self, step: int, state: Mapping[str, Any], metrics: Mapping[str, Any] | None = None
    ) -> SaveFuture:
        """Save ``state`` as ``step`` in the background; returns once it is staged.

        Waits for the previous save first (never two in flight) and raises its
        error if it failed, once; then the state is saved as usual.

        ``metrics`` (a dict of finite numbers and strings, e.g. ``{"loss":
        0.12}``) is stored in the checkpoint's metadata (``extra["metrics"]``),
        shown by ``async-ckpt ls`` and ranks the step for ``keep_best``; a
        value that cannot be stored raises :class:`CheckpointError` here, before
        anything is saved. With several ranks, rank 0's metrics are stored.
        """
        self._check_open()
        step = check_step(step)
        extra = self._metrics.extra(step, metrics)
        self._saves.collect(None)
        self._retain_logged()
        self._warn_if_rewound(step)
        cid = self.store.checkpoint_id(step)
        base = self._saves.base() if self.incremental else None
        in_flight(self.store.identity(step), True)
        try:
            future = self.checkpointer.save(
                state,
                storage_writer=detect_writer(cid, storage_options=self.storage_options),
                extra=extra,
                incremental=self.incremental,
                base=base,
            )
        except BaseException:
            self._saves.finished(step, None)
            raise
        with self._lock:
            self._saves.started(step, future)
            self._last_step = step
        future.add_done_callback(lambda fut: self._saves.finished(step, fut))
        return future

    def _warn_if_rewound(self, step: int) -> None:
        if self.rank != 0 or step == self._last_step:
            return
        newer = [s for s in self.store.committed() if s > step]
        if newer:
            log.warning(
                "saving step %d under %s, which holds newer committed steps %s: latest_step() "
                "and restore() still pick step %d; delete those steps if this run replaces them",
                step,
                self.root,
                newer,
                newer[-1],
            )

    def wait(self, timeout: float | None = None) -> None:
        """Block until the pending save committed and retention ran; raise its error."""
        self._saves.collect(timeout)
        self._retain_logged()

    # ----------------------------------------------------------------- retention
    def _retain_logged(self) -> None:
        try:
            self.retain()
        except Exception as exc:  # a failed deletion must not stop training
            log.warning("retention under %s failed: %s", self.root, exc)

    def retain(self) -> list[int]:
        """Delete committed steps the retention policy does not keep; returns them.

        Kept: the ``keep_last`` newest committed steps, steps divisible by
        ``keep_every``, the ``keep_best`` steps with the best metric (and any
        whose metadata could not be read), the step this manager committed last
        and any step a save is writing. Leftovers of failed saves (directories
        without metadata) older than the newest committed step go too. Only
        rank 0 deletes; other ranks return ``[]``.
        """
        if self.rank != 0:
            return []
        with self._lock:
            return remove_unkept(
                self.store,
                self._metrics,
                Policy(self.keep_last, self.keep_every, self.keep_best, self.mode),
                self._saves.newest_saved,
            )

    # ------------------------------------------------------------------- restore
    def restore(
        self,
        state: Mapping[str, Any],
        step: int | None = None,
        *,
        strict: KeyCheck = True,
        allow_lossy_cast: bool = False,
    ) -> int:
        """Load the newest committed step (or ``step``) into ``state`` in place; returns the step.

        With the memory tier, the step comes from memory when every rank can get
        one at least as new as storage's newest (``step``: exactly that one);
        :attr:`last_restore` says from where.

        ``strict`` and ``allow_lossy_cast`` are passed to :func:`async_ckpt.load`.

        Raises :class:`CheckpointNotFoundError` when neither the root nor the memory
        tier holds a committed checkpoint (start from scratch then).
        """
        self._saves.collect(None)
        info = restore_step(
            state,
            step,
            strict,
            allow_lossy_cast,
            store=self.store,
            memory=self._memory,
            checkpointer=self.checkpointer,
            storage_options=self.storage_options,
            latest_step=self.latest_step,
        )
        with self._lock:
            self._last_step = info.step
        self.last_restore = info
        if info.source == "storage":
            log.info("restored %s", self.store.checkpoint_id(info.step))
        else:
            log.info(
                "restored step %d from the memory tier (%s) in %.2f s",
                info.step,
                "own copy" if info.holder is None else f"replica from rank {info.holder}",
                info.seconds,
            )
        return info.step

    def clear_memory(self) -> None:
        """Delete this rank's memory-tier snapshots and the replicas it holds for its peer
        (after the save in flight), so that no later restore resumes from them. Other
        ranks' files are theirs to delete: call it on every rank. ``async-ckpt memory
        ROOT --clear`` deletes a whole node's, when no job runs there."""
        if self._memory is None:
            raise CheckpointError("clear_memory needs CheckpointManager(memory_every=N)")
        self._memory.clear()

    # ----------------------------------------------------------------- lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this CheckpointManager is closed; create a new one")

    def close(self) -> None:
        """Finish the pending save, apply retention and stop the worker (if the manager made it).

        A failure of the pending save is logged, not raised; call ``wait()``
        first to handle it.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._saves.collect(None)
        except Exception:  # logged by the checkpointer
            pass
        if self._preemption is not None:
            self._preemption.close()
        self._retain_logged()
        if self._memory is not None:
            self._memory.close()
        if self._owns_checkpointer:
            self.checkpointer.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        best = (
            f", keep_best={self.keep_best}, metric={self.metric!r}, mode={self.mode!r}"
            if self.metric is not None
            else ""
        )
        return (
            f"CheckpointManager({self.root!r}, keep_last={self.keep_last}, "
            f"keep_every={self.keep_every}, save_every={self.save_every}{best})"
        )
