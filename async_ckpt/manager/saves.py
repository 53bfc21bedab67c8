"""A CheckpointManager's save in flight (at most one) and the step it committed last.

A commit is recorded twice, under the manager's lock: by the save's done
callback (the worker's reply thread), and by the training thread when it
collects the save (the next ``save``, ``wait``, ``restore``, ``close``), which
may come first: the retention that follows must already keep that step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..executor import SaveFuture
from ..executor.future import settle
from .metrics import StepMetrics
from .retention import in_flight
from .root import StepStore


class SaveTracker:
    """The pending save, and the newest step committed through it.

    ``retain`` runs after each commit the done callback sees; ``lock`` is the
    manager's, shared with its retention and metrics.
    """

    def __init__(
        self,
        store: StepStore,
        metrics: StepMetrics,
        lock: threading.RLock,
        retain: Callable[[], None],
    ) -> None:
        self.store = store
        self._metrics = metrics
        self._lock = lock
        self._retain = retain
        self._pending: SaveFuture | None = None
        self._pending_step: int | None = None
        self.newest_saved: int | None = None  # committed last by this manager: kept

    def started(self, step: int, future: SaveFuture) -> None:
        with self._lock:
            self._pending, self._pending_step = future, step

    def pending(self) -> tuple[SaveFuture | None, int | None]:
        """The save in flight and its step; (None, None) when there is none."""
        with self._lock:
            return self._pending, self._pending_step

    def base(self) -> str | None:
        """The newest committed step's id: what an incremental save shares bytes with.

        The step this manager committed last when there is one (kept by retention;
        no listing of the root per save), else the newest under the root.
        """
        newest = self.newest_saved
        if newest is None:
            committed = self.store.committed()
            newest = committed[-1] if committed else None
        return None if newest is None else self.store.checkpoint_id(newest)

    def finished(self, step: int, future: SaveFuture | None) -> None:
        """Done callback of a save (worker's reply thread): retention after a commit."""
        in_flight(self.store.identity(step), False)
        if future is None or future.cancelled() or future.exception() is not None:
            return  # the checkpointer logged the failure; nothing is deleted for it
        self._committed(step, future)
        self._retain()

    def _committed(self, step: int, future: SaveFuture) -> None:
        """Record a commit of this manager: kept by retention, its metrics known."""
        extra = getattr(future.result(), "extra", None) or {}
        metrics = extra.get("metrics")  # rank 0's, on every rank
        with self._lock:
            self.newest_saved = step
            self._metrics.remember(step, metrics)

    def collect(self, timeout: float | None) -> None:
        """Wait for the pending save; raise its error (not a cancellation) once."""
        with self._lock:
            future, step = self._pending, self._pending_step
        if future is None:
            return
        assert step is not None  # set together with _pending
        if settle(future, timeout, lambda: self._forget(future)):
            self._committed(step, future)  # before the done callback may have run
            self._forget(future)

    def _forget(self, future: SaveFuture) -> None:
        with self._lock:
            if self._pending is future:
                self._pending, self._pending_step = None, None
