"""What an executor is handed per save, and the interface executors implement.

Call order (caller's thread unless noted): ``create(setup)`` once;
``start()`` once (optional, pre-warms); per save ``check_writer(writer)``
(on the class, before anything starts), ``restart_after_failure()`` when the
previous save failed, and ``submit(job)`` after staging began; ``abort()``
from any thread to stop the in-flight save (cancel, timeout); ``close()`` once.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ..pipeline.incremental import Incremental
from ..pipeline.save import SaveTimings
from ..staging.snapshot import Snapshot
from ..storage.base import StorageWriter
from .future import SaveFuture


@dataclass(frozen=True)
class ExecutorSetup:
    """What an executor is built from: the checkpointer's group settings."""

    process_group: Any
    distributed: bool  # whether saves are collective over ``process_group``
    group_timeout: float


@dataclass
class SaveJob:
    """One save handed to an executor; ``extra`` (checked) goes into the metadata,
    ``incremental`` says whether and against which base the save is incremental."""

    save_no: int
    snapshot: Snapshot
    writer: StorageWriter
    future: SaveFuture
    started: float = field(default_factory=time.perf_counter)
    extra: dict[str, Any] = field(default_factory=dict)
    incremental: Incremental | None = None
    aborted: threading.Event = field(default_factory=threading.Event)

    def finish(
        self,
        meta: Any = None,
        error: BaseException | None = None,
        timings: SaveTimings | None = None,
    ) -> None:
        """Release the staging buffers, record the figures and resolve the future."""
        self.snapshot.release()
        stats = self.future.stats
        if timings is not None:
            stats.plan_s, stats.write_s, stats.commit_s = (
                timings.plan_s,
                timings.write_s,
                timings.commit_s,
            )
            stats.plan_reused = timings.plan_reused
            stats.bytes = timings.bytes_written
        stats.total_s = time.perf_counter() - self.started
        if error is not None:
            self.future._set_exception(error)
        else:
            self.future._set_result(meta)


class Executor(ABC):
    """Runs the background part of saves (plan, validate, write, commit) in order."""

    @classmethod
    @abstractmethod
    def create(cls, setup: ExecutorSetup) -> Executor:
        """Build the executor on the caller's thread (it may run collectives there)."""

    @classmethod
    def check_writer(cls, writer: StorageWriter) -> None:
        """Raise :class:`CheckpointError` if this executor cannot save through ``writer``."""
        return None  # by default, every writer

    def restart_after_failure(self) -> None:
        """The previous save failed (on every rank alike): reset what that may have broken."""
        return None  # by default, a failed save leaves nothing behind

    @abstractmethod
    def start(self) -> None:
        """Get ready for the first save (spawn the worker, join its group)."""

    @abstractmethod
    def submit(self, job: SaveJob) -> None:
        """Queue ``job``; it runs once its snapshot is staged."""

    @abstractmethod
    def abort(self, reason: BaseException, save_no: int | None = None) -> None:
        """Stop save ``save_no`` (every in-flight save if None) so it cannot commit.

        Its future fails with ``reason``. The process executor stops saves by
        killing the worker, so saves queued behind it fail too (named as such).
        """

    @abstractmethod
    def close(self) -> None:
        """Finish queued saves and release resources; idempotent."""
