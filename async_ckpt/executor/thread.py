"""The thread executor: background saves in a thread of the caller's process."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError

from ..dist.arrival import check_in
from ..dist.comm import Comm
from ..dist.group import thread_comm
from ..pipeline.save import SaveTimings, run_save
from ..pipeline.waves import snapshot_waves
from ..planning.plan import Planner
from ..threads import Workers
from .base import Executor, ExecutorSetup, SaveJob


class ThreadExecutor(Executor):
    """Runs saves one after another in a background thread.

    Same futures and guarantees as the process executor, without a second
    process; the write competes with training for this process's GIL less than
    one might fear (file writes and checksums release it). Collectives go to a
    gloo group created for the checkpointer, never the training group.
    """

    def __init__(self, comm_factory: Callable[[], Comm]) -> None:
        self._comm_factory = comm_factory
        self._comm: Comm | None = None
        self._planner = Planner()
        # Takes saves after the main thread ended too; the save cannot run inline (it
        # waits for the staging that follows the hand-off), so no thread is an error.
        self._pool = Workers(1, "async_ckpt-save", run_here_if_no_thread=False)
        self._jobs: dict[int, SaveJob] = {}  # submitted and not finished (queued or running)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def create(cls, setup: ExecutorSetup) -> ThreadExecutor:
        pg, distributed, timeout = setup.process_group, setup.distributed, setup.group_timeout
        executor = cls(lambda: thread_comm(pg, distributed, timeout))
        executor.start()  # new_group is a collective: run it on the caller's thread
        return executor

    def start(self) -> None:
        if self._comm is None:
            self._comm = self._comm_factory()

    def submit(self, job: SaveJob) -> None:
        self.start()
        with self._lock:
            self._jobs[job.save_no] = job
        try:
            self._pool.submit(self._run, job)
        except BaseException:
            with self._lock:
                self._jobs.pop(job.save_no, None)  # the caller fails it and frees its buffer
            raise

    def _run(self, job: SaveJob) -> None:
        timings = SaveTimings()
        try:
            job.snapshot.waves[0].staged.result()
            if job.aborted.is_set():
                raise CancelledError("aborted before it started writing")
            check_in(self._comm, f"save {job.save_no} (AsyncCheckpointer.save / async_save)")
            meta = run_save(
                job.snapshot.state,
                snapshot_waves(job.snapshot, job.aborted.is_set),
                job.writer,
                self._comm,
                self._planner,
                timings=timings,
                should_abort=job.aborted.is_set,
                extra=job.extra,
                incremental=job.incremental,
            )
            job.finish(meta=meta, timings=timings)
        except BaseException as exc:
            job.finish(error=exc, timings=timings)
        finally:
            with self._lock:
                self._jobs.pop(job.save_no, None)

    def abort(self, reason: BaseException, save_no: int | None = None) -> None:
        # A thread cannot be killed: the running save is marked and stops before its
        # commit, queued ones before they write; each keeps its buffer until it stops.
        with self._lock:
            jobs = [j for j in self._jobs.values() if save_no is None or j.save_no == save_no]
        for job in jobs:
            job.aborted.set()
            job.future._set_exception(reason)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown()
