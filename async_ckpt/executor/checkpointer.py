"""AsyncCheckpointer: stage, hand off to an executor, return a future."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from ..dist.group import DEFAULT_TIMEOUT_S
from ..dist.ranks import use_distributed
from ..errors import CheckpointError, SaveFailedError, SaveInProgressError, SaveTimeoutError
from ..gc_pause import gc_paused
from ..pipeline.commit import check_extra
from ..pipeline.incremental import Incremental, incremental_save
from ..staging.snapshot import Snapshot
from ..staging.stager import Stager
from ..state.describe import DescribeCache, describe
from ..state.flatten import Flat, flatten, take_states
from ..state.local_view import local_view
from ..state.model import LocalState
from ..state.shortcut import FlatDictShortcut
from ..storage.base import StorageWriter
from ..storage.detect import detect_writer
from . import at_exit, inflight
from .base import Executor, ExecutorSetup, SaveJob
from .future import AwaitableFuture, SaveFuture, SaveStats
from .handover import Handover, drop
from .registry import executor_class

log = logging.getLogger("async_ckpt")


class AsyncCheckpointer:
    """Owns a stager and a background executor; saves one state after another.

    ``executor="process"`` (default) writes from a persistent worker process;
    ``"thread"`` from a thread of this process. ``start()`` pre-warms the
    worker so the first save costs no more than later ones. A save started
    while the previous one still holds the staging buffer waits for it
    (``if_busy="wait"``) or raises :class:`SaveInProgressError` (``"raise"``).
    ``on_saved`` is called with each save's :class:`SaveStats`.

    In a multi-rank job create it on every rank at the same point of the
    program (its start is a collective on ``process_group``; a start on some
    ranks only raises :class:`RanksMissingError` after
    ``ASYNC_CKPT_ARRIVAL_TIMEOUT_S``); ``no_dist=True`` saves this process alone.

    Lifetime: the worker and the staging memory (one buffer the size of the
    state per ``num_buffers``) are made at the first save (or ``start()``) and
    reused by every save; ``close()`` (or leaving a ``with`` block, or
    interpreter exit) waits for the last save, bounded by ``timeout`` or
    ``group_timeout``, then frees them. A checkpointer dropped without
    ``close()`` keeps them until interpreter exit (its threads hold it): a
    program that makes and drops checkpointers closes each one.
    ``timeout`` bounds each save: one not committed by then is stopped and
    fails with :class:`SaveTimeoutError`.

    ``local_view=True`` stores each rank's local tensor of a DTensor or
    ShardedTensor leaf instead of its piece of the global tensor: a checkpoint of
    one rank that restores onto the same sharding (the memory tier's snapshots).

    Errors: ``save()`` raises at the call for state that cannot be saved
    (:class:`StateDictError`, :class:`UnsafeObjectError`) or a storage it
    cannot use; everything that happens later (a failed write, a rank that
    died, :class:`WorkerDiedError`) fails that save's future, nothing is
    committed, and the next save starts a fresh worker.
    """

    def __init__(
        self,
        *,
        executor: Literal["process", "thread"] = "process",
        stager: Stager | None = None,
        process_group: Any = None,
        no_dist: bool = False,
        timeout: float | None = None,
        group_timeout: float = DEFAULT_TIMEOUT_S,
        if_busy: Literal["wait", "raise"] = "wait",
        on_saved: Callable[[SaveStats], None] | None = None,
        local_view: bool = False,
    ) -> None:
        self._executor_class = executor_class(executor)
        if if_busy not in ("wait", "raise"):
            raise CheckpointError(f"if_busy must be 'wait' or 'raise', not {if_busy!r}")
        self.stager = stager or Stager()
        self._owns_stager = stager is None
        self.process_group = process_group
        self.distributed = use_distributed(process_group, no_dist)
        self.timeout = timeout
        self.group_timeout = group_timeout
        self.if_busy = if_busy
        self.on_saved = on_saved
        self.local_view = local_view  # each rank's local tensors: the memory tier's saves
        self._executor: Executor | None = None
        self._last: SaveFuture | None = None
        self._save_no = 0
        self._lock = threading.Lock()
        self._closed = False
        self._describe_cache = DescribeCache()
        self._shortcut = FlatDictShortcut()
        self._walk_elsewhere = False  # see _save_elsewhere
        self._handed_over = 0  # saves queued on the staging thread, not yet past it
        self._waited_out: SaveFuture | None = None  # hung past the exit hook's wait
        at_exit.track(self)

    # ------------------------------------------------------------------ lifecycle
    def _ensure_executor(self) -> Executor:
        if self._executor is None:
            setup = ExecutorSetup(self.process_group, self.distributed, self.group_timeout)
            self._executor = self._executor_class.create(setup)
        return self._executor

    def start(self, state_dict: Mapping[str, Any] | None = None) -> AsyncCheckpointer:
        """Spawn the worker (and join the ranks' group) now rather than at the first save.

        Given the state that will be saved, also allocate and pre-fault the
        staging memory for it, so the first save stalls no longer than later ones.
        """
        self._check_open()
        self._ensure_executor().start()
        if state_dict is not None:
            self.stager.reserve(*describe(self._flatten(state_dict)))
        return self

    def _describe(self, state_dict: Mapping[str, Any]) -> tuple[LocalState, list[torch.Tensor]]:
        """The state described: the previous description when the shortcut holds (the same
        flat dict of tensors again), else a full walk."""
        found = None if self.local_view else self._shortcut.lookup(state_dict)
        if found is not None:
            return found
        state, tensors = describe(self._flatten(state_dict), self._describe_cache)
        if not self.local_view:
            self._shortcut.remember(state_dict, state, tensors)
        return state, tensors

    def _flatten(self, state_dict: Mapping[str, Any], states: Any = None) -> Flat:
        flat = flatten(state_dict, states)
        return local_view(flat) if self.local_view else flat

    @property
    def worker_pid(self) -> int | None:
        """The worker process id (process executor), None otherwise or before start."""
        return getattr(self._executor, "worker_pid", None)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed; create a new one")

    # ---------------------------------------------------------------------- saves
    def save(
        self,
        state_dict: Mapping[str, Any],
        *,
        checkpoint_id: Any = None,
        storage_writer: StorageWriter | None = None,
        timeout: float | None = None,
        extra: Mapping[str, Any] | None = None,
        incremental: bool = False,
        base: Any = None,
    ) -> SaveFuture:
        """Stage ``state_dict`` and return a :class:`SaveFuture` while it is written.

        With synchronous staging (default) the state may be mutated as soon as
        this returns; with ``async_staging`` only after ``fut.staged`` is done.
        With ``async_staging``, saves after the first walk the state on the
        staging thread (only Stateful objects' ``state_dict()`` runs here), so
        errors in the state then fail the future (docs/concepts.md, "Where the
        walk of the state runs").

        ``extra`` is a small dict of application data (metrics, a run id) stored
        in the checkpoint's metadata (``Metadata.extra``; ``async-ckpt ls`` shows
        its ``"metrics"``): string keys, finite numbers, strings and dicts of
        them; anything else raises :class:`CheckpointError` here, before anything
        is staged. With several ranks, rank 0's ``extra`` is the one committed.

        ``base`` (a checkpoint id) makes the save incremental: chunks whose
        bytes equal ``base``'s are shared with it instead of written, and the
        new checkpoint still stands alone (docs/incremental.md).
        ``incremental=True`` without a base records the digests that let a
        later save use this one as its base.
        """
        self._check_open()
        t0 = time.perf_counter()
        extra = check_extra(extra)
        spec = incremental_save(incremental, base)
        writer = storage_writer or detect_writer(checkpoint_id)
        self._executor_class.check_writer(writer)
        executor = self._ensure_executor()
        previous = self._last
        if previous is not None and previous.done():
            if previous.cancelled() or previous.exception() is not None:
                executor.restart_after_failure()
        if previous is not None and not previous.done():
            if self.if_busy == "raise" and not self.stager.buffer_free():
                raise SaveInProgressError(
                    f"a save to {previous.stats.checkpoint_id!r} is still running; await it "
                    "first, or use if_busy='wait'"
                )
        # Also while saves handed to the staging thread are still queued there: a save
        # staged here would take a buffer ahead of them, and they would wait for it.
        if self.stager.options.async_staging and (self._walk_elsewhere or self._handed_over):
            return self._save_elsewhere(state_dict, writer, executor, t0, timeout, extra, spec)
        with gc_paused():  # a big state's walk would trigger many full collections
            state, tensors = self._describe(state_dict)
        with self._lock:
            self._save_no += 1
            save_no = self._save_no
        stats = SaveStats(checkpoint_id=writer.checkpoint_id)
        snapshot = self.stager.begin(state, tensors)
        future = SaveFuture(stats, staged=AwaitableFuture())
        self._chain_staged(snapshot, future, t0)
        job = SaveJob(
            save_no=save_no,
            snapshot=snapshot,
            writer=writer,
            future=future,
            started=t0,
            extra=extra,
            incremental=spec,
        )
        self._register(future, save_no, timeout)
        try:
            executor.submit(job)  # before the copy: later waves wait for earlier ones' writes
        except BaseException as exc:  # e.g. no thread can start: the buffer goes back
            drop(snapshot, exc)
            future._set_exception(exc)
            raise
        cuda = _copies_from_cuda(snapshot)
        # Last, so that with async staging nothing of ours runs here after the
        # staging thread starts (it would compete with this thread for the GIL).
        with gc_paused():
            self.stager.fill(snapshot)
        # With async staging, later saves walk the state on the staging thread (below);
        # not a CUDA state: its copies are queued here, in order with the caller's stream.
        self._walk_elsewhere = self.stager.options.async_staging and not cuda
        stats.stall_s = time.perf_counter() - t0
        return future

    def _register(self, future: SaveFuture, save_no: int, timeout: float | None) -> None:
        """Number the save, make it cancellable and time-limited, mark its id as in flight."""
        future.save_no = save_no
        future._cancel_hook = lambda: self._abort(future, None)
        writing = inflight.started(future.stats.checkpoint_id)  # async_ckpt.delete refuses it
        future.add_done_callback(lambda _: inflight.finished(writing))
        future.add_done_callback(self._after_save)
        limit = timeout if timeout is not None else self.timeout
        if limit is not None:
            timer = threading.Timer(limit, self._abort, args=(future, limit))
            timer.daemon = True
            try:
                timer.start()
                future.add_done_callback(lambda _: timer.cancel())
            except RuntimeError:  # no thread can start (exit, on some Pythons): close() bounds it
                log.warning(
                    "no timer thread for the save to %s: its timeout is not applied",
                    future.stats.checkpoint_id,
                )
        self._last = future

    def _save_elsewhere(
        self,
        state_dict: Mapping[str, Any],
        writer: StorageWriter,
        executor: Executor,
        t0: float,
        timeout: float | None,
        extra: dict[str, Any],
        spec: Incremental | None,
    ) -> SaveFuture:
        """An async-staging save after the first: only the Stateful objects' state_dict()
        calls (they may run collectives) happen on this thread; the walk of the state,
        its layout, the hand-off and the copy run on the staging thread, in order with
        earlier saves. What that walk finds wrong fails the future instead of raising."""
        states = take_states(state_dict)
        with self._lock:
            self._save_no += 1
            save_no = self._save_no
        future = SaveFuture(SaveStats(checkpoint_id=writer.checkpoint_id), staged=AwaitableFuture())
        handover = Handover(state_dict, states, writer, executor, t0, extra, spec)
        future._handover = handover
        self._register(future, save_no, timeout)
        with self._lock:
            self._handed_over += 1
        self.stager.in_staging_thread(lambda: self._stage_elsewhere(future, handover))
        future.stats.stall_s = time.perf_counter() - t0
        return future

    def _stage_elsewhere(self, future: SaveFuture, handover: Handover) -> None:
        """The staging thread's part of :meth:`_save_elsewhere`."""
        try:
            self._walk_and_hand_over(future, handover)
        finally:
            handover.state_dict, handover.states = {}, {}  # the future must not keep them
            self._passed(handover)

    def _passed(self, h: Handover) -> None:
        """Count ``h`` out of the saves queued on the staging thread (once). Called before
        its future fails, so that a caller who sees the failure and saves again is not
        sent to the staging thread by a count that has not caught up yet."""
        with self._lock:
            if not h.passed:
                h.passed = True
                self._handed_over -= 1

    def _walk_and_hand_over(self, future: SaveFuture, h: Handover) -> None:
        try:
            if h.aborted:
                return
            with gc_paused():
                state, tensors = describe(
                    self._flatten(h.state_dict, h.states), self._describe_cache
                )
                snapshot = self.stager.begin(state, tensors)
        except BaseException as exc:
            self._walk_elsewhere = False  # the next save walks on the caller's thread again
            self._passed(h)
            future._set_exception(exc)
            return
        if _copies_from_cuda(snapshot):
            self._walk_elsewhere = False  # CUDA tensors now: see save()
        self._chain_staged(snapshot, future, h.started)
        assert future.save_no is not None
        job = SaveJob(
            future.save_no,
            snapshot,
            h.writer,
            future,
            h.started,
            extra=h.extra,
            incremental=h.incremental,
        )
        with h.lock:  # an abort either comes before the hand-off or stops the job
            if h.aborted:
                drop(snapshot, SaveFailedError("the save was stopped before it was staged"))
                return
            try:
                h.executor.submit(job)
            except BaseException as exc:
                self._passed(h)
                drop(snapshot, exc)
                future._set_exception(exc)
                return
            h.submitted = True
        self.stager.fill(snapshot, here=True)

    @staticmethod
    def _chain_staged(snapshot: Snapshot, future: SaveFuture, t0: float) -> None:
        def forward(f: Any) -> None:
            future.stats.staged_s = time.perf_counter() - t0
            future.stats.copied_bytes = snapshot.copied_bytes
            future.stats.staging_memory = snapshot.staging_memory
            if f.exception() is not None and snapshot.stopped.is_set():
                # staging stopped because a write failed: that error ends the save
                if not future.staged.done():
                    future.staged.set_exception(f.exception())
            elif f.exception() is not None:
                future._set_exception(f.exception())
            elif not future.staged.done():
                future.staged.set_result(None)

        snapshot.staged.add_done_callback(forward)

    def _abort(self, future: SaveFuture, limit: float | None) -> bool:
        if future.done() or self._executor is None:
            return False
        reason: BaseException
        if limit is None:
            from concurrent.futures import CancelledError

            reason = CancelledError(f"save to {future.stats.checkpoint_id!r} was cancelled")
        else:
            reason = SaveTimeoutError(
                f"save to {future.stats.checkpoint_id!r} did not commit within {limit} s; "
                "it was stopped and nothing was committed"
            )
        handover = future._handover
        if isinstance(handover, Handover):
            with handover.lock:
                if not handover.submitted:  # still waiting for the staging thread: stop it there
                    handover.aborted = True
                    future._set_exception(reason)
                    return True
        self._executor.abort(reason, save_no=future.save_no)
        return True

    def _after_save(self, future: SaveFuture) -> None:
        if future.cancelled():
            log.warning("save to %s was cancelled", future.stats.checkpoint_id)
            return
        if future.exception() is not None:
            log.warning("save to %s failed: %s", future.stats.checkpoint_id, future.exception())
            return
        log.info(future.stats.line())
        if self.on_saved is not None:
            self.on_saved(future.stats)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the latest save finished (its error, if any, is raised)."""
        if self._last is not None:
            self._last.result(timeout)

    def close(self) -> None:
        """Finish the pending save, stop the worker and free the staging memory."""
        if self._closed:
            return
        self._closed = True
        self._finish_last(stop_if_hung=True)
        if self._executor is not None:
            self._executor.close()
        if self._owns_stager:
            self.stager.close()

    def _finish_last(self, stop_if_hung: bool) -> None:
        """Wait for the latest save, bounded; ``stop_if_hung``: stop it if still running."""
        last = self._last
        if last is None:
            return
        # Bounded: a hung storage write must not hang interpreter exit forever.
        limit = self.timeout if self.timeout is not None else self.group_timeout
        try:
            # once only: the exit hook may have spent the whole limit on this save already
            last.result(timeout=0 if last is self._waited_out else limit)
        except concurrent.futures.TimeoutError:  # not the builtin on Python 3.10
            # SaveTimeoutError is a TimeoutError too: only a save still running is hung
            if last.done():
                return
            if not stop_if_hung:
                self._waited_out = last
                return
            log.error("the last save did not finish within %s s of close(); stopping it", limit)
            if self._executor is not None:
                self._executor.abort(SaveTimeoutError(f"stopped by close() after {limit} s"))
        except BaseException:  # reported through the future already
            pass

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _copies_from_cuda(snapshot: Snapshot) -> bool:
    """Whether a snapshot not yet filled copies CUDA tensors (begin read their stream)."""
    return snapshot.to_copy is not None and snapshot.to_copy.stream is not None
