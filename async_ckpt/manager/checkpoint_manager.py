"""CheckpointManager: periodic asynchronous saves under one root, retention, resume.

One checkpoint per step lives at ``<root>/step-<step:08d>``; a step counts once
its save committed (its ``metadata.json`` exists). The manager keeps at most
one save in flight, deletes old checkpoints after each commit, removes what a
crash left behind when it starts (once it is older than a grace period: it may
be a save another process is still writing), and restores the newest committed
step. Restoring never needs write access to the root.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from concurrent.futures import CancelledError
from typing import Any, Literal

from ..api import load
from ..errors import CheckpointError, CheckpointNotFoundError
from ..executor import AsyncCheckpointer, SaveFuture
from ..pipeline.load import KeyCheck
from ..settings import env_seconds
from .retention import (
    INCOMPLETE_GRACE_ENV,
    INCOMPLETE_GRACE_S,
    in_flight,
    remove_incomplete,
    steps_to_keep,
    writing,
)
from .root import StepStore

log = logging.getLogger("async_ckpt")


def _positive(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise CheckpointError(f"{name} must be a positive integer or None, not {value!r}")
    return value


def _grace(value: float | None) -> float:
    """The grace period for incomplete steps: ``value``, else the environment, else the default."""
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise CheckpointError(
                f"incomplete_grace_s must be a non-negative number of seconds, not {value!r}"
            )
        return float(value)
    return env_seconds(INCOMPLETE_GRACE_ENV, INCOMPLETE_GRACE_S)


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step must be a non-negative integer, not {step!r}")
    return step


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
        **checkpointer_kwargs: Any,
    ) -> None:
        self.incomplete_grace_s = _grace(incomplete_grace_s)
        self.keep_last = _positive("keep_last", keep_last)
        self.keep_every = _positive("keep_every", keep_every)
        self.save_every = _positive("save_every", save_every)
        self.store = StepStore(root)
        self.root = self.store.root
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
        self._lock = threading.RLock()
        self._pending: SaveFuture | None = None
        self._pending_step: int | None = None
        self._last_step: int | None = None  # saved or restored last: maybe_save skips it
        self._newest_saved: int | None = None  # committed last by this manager: kept
        self._closed = False
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
        return self.store.checkpoint_id(_check_step(step))

    # --------------------------------------------------------------------- saves
    def maybe_save(self, step: int, state: Mapping[str, Any]) -> SaveFuture | None:
        """Save ``state`` as ``step`` if ``step`` is a multiple of ``save_every``.

        Returns the save's future, or None when this step is not saved (also
        when this manager just saved or restored this very step).
        """
        if self.save_every is None:
            raise CheckpointError(
                "maybe_save needs CheckpointManager(save_every=N); or call save(step, state)"
            )
        if _check_step(step) % self.save_every != 0 or step == self._last_step:
            return None
        return self.save(step, state)

    def save(self, step: int, state: Mapping[str, Any]) -> SaveFuture:
        """Save ``state`` as ``step`` in the background; returns once it is staged.

        Waits for the previous save first (never two in flight) and raises its
        error if it failed, once; then the state is saved as usual.
        """
        self._check_open()
        step = _check_step(step)
        self._collect(None)
        self._retain_logged()
        self._warn_if_rewound(step)
        cid = self.store.checkpoint_id(step)
        in_flight(self.store.identity(step), True)
        try:
            future = self.checkpointer.save(state, checkpoint_id=cid)
        except BaseException:
            self._finished(step, None)
            raise
        with self._lock:
            self._pending, self._pending_step = future, step
            self._last_step = step
        future.add_done_callback(lambda fut: self._finished(step, fut))
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

    def _finished(self, step: int, future: SaveFuture | None) -> None:
        """Done callback of a save (worker's reply thread): retention after a commit."""
        in_flight(self.store.identity(step), False)
        if future is None or future.cancelled() or future.exception() is not None:
            return  # the checkpointer logged the failure; nothing is deleted for it
        with self._lock:
            self._newest_saved = step
        self._retain_logged()

    def _collect(self, timeout: float | None) -> None:
        """Wait for the pending save; raise its error (not a cancellation) once."""
        with self._lock:
            future, step = self._pending, self._pending_step
        if future is None:
            return
        try:
            future.result(timeout)
        except BaseException as exc:
            if not future.done():
                raise  # the wait timed out; the save goes on
            self._forget(future)
            if isinstance(exc, CancelledError):
                return
            raise
        with self._lock:
            self._newest_saved = step  # before the done callback may have run
        self._forget(future)

    def _forget(self, future: SaveFuture) -> None:
        with self._lock:
            if self._pending is future:
                self._pending, self._pending_step = None, None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the pending save committed and retention ran; raise its error."""
        self._collect(timeout)
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
        ``keep_every``, the step this manager committed last and any step a
        save is writing. Leftovers of failed saves (directories without
        metadata) older than the newest committed step go too. Only rank 0
        deletes; other ranks return ``[]``.
        """
        if self.rank != 0:
            return []
        with self._lock:
            found = self.store.scan()
            committed = sorted(s for s, done in found.items() if done)
            if not committed:
                return []
            keep = steps_to_keep(committed, self.keep_last, self.keep_every, self._newest_saved)
            busy = writing()
            removed = []
            for step in committed:
                if step in keep or self.store.identity(step) in busy:
                    continue
                self.store.remove(step)
                removed.append(step)
                log.info(
                    "removed checkpoint %s (keep_last=%s, keep_every=%s)",
                    self.store.checkpoint_id(step),
                    self.keep_last,
                    self.keep_every,
                )
            # A failed save's directory is not written any more once a later save committed.
            for step in sorted(s for s, done in found.items() if not done and s < committed[-1]):
                if self.store.identity(step) not in busy:
                    self.store.remove(step)
                    log.info("removed %s, left by a failed save", self.store.checkpoint_id(step))
            return removed

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

        ``strict`` and ``allow_lossy_cast`` are passed to :func:`async_ckpt.load`.

        Raises :class:`CheckpointNotFoundError` when the root holds no committed
        checkpoint (check ``latest_step()`` first to start from scratch).
        """
        self._collect(None)
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint under {self.root!r}; start from scratch "
                    "(check manager.latest_step() is not None before restoring)"
                )
        cid = self.store.checkpoint_id(_check_step(step))
        load(
            state,
            checkpoint_id=cid,
            strict=strict,
            allow_lossy_cast=allow_lossy_cast,
            process_group=self.checkpointer.process_group,
            no_dist=not self.checkpointer.distributed,
        )
        with self._lock:
            self._last_step = step
        log.info("restored %s", cid)
        return step

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
            self._collect(None)
        except Exception:  # logged by the checkpointer
            pass
        self._retain_logged()
        if self._owns_checkpointer:
            self.checkpointer.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({self.root!r}, keep_last={self.keep_last}, "
            f"keep_every={self.keep_every}, save_every={self.save_every})"
        )
