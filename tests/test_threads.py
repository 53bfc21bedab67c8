"""async_ckpt.threads: the plain threads that run saves' and loads' parallel work.

Every test synchronises on events; the waits are bounds for a broken test only.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from async_ckpt import threads as threads_mod
from async_ckpt.threads import Workers, run_jobs, wait_all

WAIT_S = 30.0  # generous: the suite must pass on a busy machine


def test_workers_run_calls_in_order_and_shutdown_runs_what_is_queued():
    gate = threading.Event()
    ran: list[int] = []
    workers = Workers(1, "test")
    first = workers.submit(gate.wait, WAIT_S)
    queued = [workers.submit(ran.append, i) for i in range(5)]
    gate.set()
    workers.shutdown()  # waits for the queued calls, not only the running one
    assert first.result(0) is True
    assert ran == [0, 1, 2, 3, 4] and all(f.done() for f in queued)
    with pytest.raises(RuntimeError, match="after shutdown"):
        workers.submit(ran.append, 5)


def test_workers_report_a_failure_through_its_future_and_go_on():
    with Workers(2, "test") as workers:
        bad = workers.submit(int, "not a number")
        good = workers.submit(int, "7")
        assert good.result(WAIT_S) == 7
        assert isinstance(bad.exception(WAIT_S), ValueError)


def test_workers_start_threads_only_as_work_arrives_and_end_them_when_dropped():
    before = {t.name for t in threading.enumerate()}
    workers = Workers(3, "idle-test")
    assert {t.name for t in threading.enumerate()} == before  # nothing started yet
    workers.submit(lambda: None).result(WAIT_S)
    (thread,) = [t for t in threading.enumerate() if t.name.startswith("idle-test")]
    ref = weakref.ref(workers)
    del workers
    gc.collect()
    assert ref() is None  # the thread holds the queue, not the Workers
    thread.join(WAIT_S)
    assert not thread.is_alive()


def test_run_jobs_runs_every_job_beside_the_calling_thread():
    seen: list[int] = []
    lock = threading.Lock()
    here_ran = threading.Event()

    def fn(job: int) -> None:
        with lock:
            seen.append(job)

    run_jobs(fn, list(range(20)), 4, "test", here=here_ran.set)
    assert sorted(seen) == list(range(20)) and here_ran.is_set()


def test_run_jobs_takes_no_new_job_after_a_failure_and_waits_for_the_running_ones():
    running = threading.Event()
    release = threading.Event()
    finished: list[str] = []
    taken: list[int] = []

    def fn(job: int) -> None:
        taken.append(job)
        if job == 0:  # a long read, still running when job 1 fails
            running.set()
            release.wait(WAIT_S)
            finished.append("slow")
        elif job == 1:
            assert running.wait(WAIT_S)
            release.set()
            raise OSError("injected read failure")

    with pytest.raises(OSError, match="injected"):
        run_jobs(fn, list(range(50)), 2, "test")
    assert finished == ["slow"]  # joined before the error was raised
    assert len(taken) < 50  # the rest were never started


def test_run_jobs_raises_the_calling_threads_error_and_stops_the_others():
    started = threading.Event()
    taken: list[int] = []

    def fn(job: int) -> None:
        taken.append(job)
        started.set()

    def here() -> None:
        assert started.wait(WAIT_S)
        raise ValueError("the tiny reads failed")

    with pytest.raises(ValueError, match="tiny reads"):
        run_jobs(fn, list(range(10_000)), 1, "test", here=here)
    assert len(taken) < 10_000


def test_wait_all_waits_for_every_future_and_raises_the_first_error():
    release = threading.Event()
    returned = threading.Event()
    seen: list[object] = []
    with Workers(2, "test") as workers:
        late = workers.submit(release.wait, WAIT_S)
        failed = workers.submit(int, "x")
        assert isinstance(failed.exception(WAIT_S), ValueError)

        def wait() -> None:
            try:
                wait_all([failed, late])
            except ValueError as exc:
                seen.extend([exc, late.done()])  # done already when the error is raised
            returned.set()

        threading.Thread(target=wait, daemon=True).start()
        assert not returned.wait(0.2)  # still waiting for the late one
        release.set()
        assert returned.wait(WAIT_S)
    assert isinstance(seen[0], ValueError) and seen[1] is True


def test_an_interrupt_while_waiting_for_the_writers_still_waits_for_them():
    """Ctrl-C during a synchronous save: the writer threads read the caller's tensors,
    so the wait goes on until they end, and the interrupt is raised after."""

    class InterruptedOnce:
        joins = 0

        def join(self):
            self.joins += 1
            if self.joins == 1:
                raise KeyboardInterrupt

    threads = [InterruptedOnce(), InterruptedOnce()]
    with pytest.raises(KeyboardInterrupt):
        threads_mod.join_all(threads)
    assert [t.joins for t in threads] == [2, 2]  # each interrupted once, then waited for


def test_a_writer_thread_that_cannot_start_leaves_none_running(monkeypatch):
    started = threading.Event()
    release = threading.Event()
    returned = threading.Event()
    real_start = threading.Thread.start
    count = 0

    def second_start_fails(self):
        nonlocal count
        count += 1
        if count == 2:
            raise RuntimeError("can't start new thread")
        real_start(self)

    def first():
        started.set()
        release.wait(WAIT_S)

    monkeypatch.setattr(threading.Thread, "start", second_start_fails)
    outcome: list[BaseException] = []

    def call():
        try:
            threads_mod.run_in_threads([first, lambda: None], "test")
        except BaseException as exc:
            outcome.append(exc)
        returned.set()

    caller = threading.Thread(target=call)
    real_start(caller)
    assert started.wait(WAIT_S)
    assert not returned.wait(0.2)  # still waiting for the first writer
    release.set()
    assert returned.wait(WAIT_S)
    assert outcome and "can't start new thread" in str(outcome[0])
