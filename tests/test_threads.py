"""async_ckpt.threads: the plain threads that run saves' and loads' parallel work.

Every test synchronises on events; the waits are bounds for a broken test only.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
from helpers import exit_code_of_a_forked_child, run_python

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
    failing: list[threading.Thread] = []
    failed = threading.Event()
    finished: list[str] = []
    taken: list[int] = []

    def fn(job: int) -> None:
        taken.append(job)
        if job == 0:  # a long read, still running when job 1 fails ...
            assert failed.wait(WAIT_S)
            # ... and ending only once that thread recorded its failure and stopped
            failing[0].join(WAIT_S)
            finished.append("slow")
        elif job == 1:
            failing.append(threading.current_thread())
            failed.set()
            raise OSError("injected read failure")

    with pytest.raises(OSError, match="injected"):
        run_jobs(fn, list(range(50)), 2, "test")
    assert finished == ["slow"]  # joined before the error was raised
    assert sorted(taken) == [0, 1]  # the rest were never started


def test_run_jobs_raises_the_calling_threads_error_and_ends_its_threads():
    started = threading.Event()

    def here() -> None:
        assert started.wait(WAIT_S)
        raise ValueError("the tiny reads failed")

    with pytest.raises(ValueError, match="tiny reads"):
        run_jobs(lambda job: started.set(), list(range(10_000)), 2, "run-jobs-test", here=here)
    # every thread ended (the jobs left are skipped: see the test above)
    assert not [t for t in threading.enumerate() if t.name.startswith("run-jobs-test")]


def test_where_no_thread_can_start_the_work_runs_on_the_calling_thread(monkeypatch):
    """As at interpreter exit on Python 3.12.0-3.12.2."""
    monkeypatch.setattr(threads_mod, "start_thread", lambda *a, **k: None)
    me = threading.current_thread()
    where: list[threading.Thread] = []

    def record(*_: object) -> None:
        where.append(threading.current_thread())

    run_jobs(record, list(range(5)), 4, "test", here=record)
    threads_mod.run_in_threads([record, record], "test")
    done = Workers(2, "test").submit(record, 1)
    assert done.done() and done.exception() is None
    assert where == [me] * 9  # 5 jobs and here, 2 calls, 1 submitted
    with pytest.raises(RuntimeError, match="no save-test thread can start"):
        Workers(1, "save-test", run_here_if_no_thread=False).submit(record)


def test_a_worker_may_shut_its_own_workers_down():
    """close() from a save's own callback: the joins skip the calling thread."""
    workers = Workers(1, "test")
    assert workers.submit(workers.shutdown).result(WAIT_S) is None


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


def test_a_call_whose_thread_cannot_start_runs_on_the_calling_thread(monkeypatch):
    release = threading.Event()
    ran: dict[str, threading.Thread] = {}
    real_start = threading.Thread.start
    ours = 0

    def second_start_fails(self):
        nonlocal ours
        if self.name.startswith("cannot-start-test"):
            ours += 1
            if ours == 2:
                raise RuntimeError("can't start new thread")
        real_start(self)

    def first():
        assert release.wait(WAIT_S)  # only the second call, run meanwhile, sets it
        ran["first"] = threading.current_thread()

    def second():
        ran["second"] = threading.current_thread()
        release.set()

    monkeypatch.setattr(threading.Thread, "start", second_start_fails)
    # the last call runs here anyway: the second is the one whose thread cannot start
    threads_mod.run_in_threads([first, second, lambda: None], "cannot-start-test")
    assert ran["second"] is threading.current_thread()
    assert ran["first"] is not threading.current_thread()


def test_a_call_run_here_may_use_its_own_workers(monkeypatch):
    """Where no thread can start the call runs on the caller, outside the Workers' lock."""
    monkeypatch.setattr(threads_mod, "start_thread", lambda *a, **k: None)
    workers = Workers(1, "test")
    inner = workers.submit(lambda: workers.submit(int, "3").result(0))
    assert inner.result(0) == 3
    assert workers.submit(workers.shutdown).exception(0) is None


_BACKGROUND_AT_EXIT = """
import atexit, gc, sys, threading
from async_ckpt.threads import Workers

drop = sys.argv[1] == "dropped"
main_ended = threading.Event()
workers = Workers(1, "background", finish_at_exit=True)
# the call runs once the main thread has ended, so nobody but the exit hook waits for it
call = workers.submit(lambda: main_ended.wait() and "ran")
if drop:  # its Workers dropped with the call queued (a plugin never torn down)
    del workers
    gc.collect()
# registered after async_ckpt's exit hook, so it runs first
threading._register_atexit(main_ended.set)
atexit.register(lambda: print(call.result(0) if call.done() else "unfinished", flush=True))
"""


@pytest.mark.parametrize("workers", ["kept", "dropped"])
def test_background_work_finishes_when_the_main_thread_ends_before_atexit_handlers(workers):
    """As Python does for a thread pool's work: a memory-tier replication or a checkpoint
    removal that nobody waits for is not cut short by the interpreter's exit, also when
    its Workers was dropped."""
    assert run_python(_BACKGROUND_AT_EXIT, workers) == "ran"


_SUBMITTED_BY_AN_ATEXIT_HANDLER = """
import atexit, threading

calls = []
# registered first, so it runs last: after async_ckpt's atexit handler
atexit.register(lambda: print(calls[0].result(0) if calls[0].done() else "unfinished", flush=True))

from async_ckpt.threads import Workers


def handler():
    workers = Workers(1, "background", finish_at_exit=True)
    # slow background work (a replication): the interpreter would finalize meanwhile
    calls.append(workers.submit(lambda: threading.Event().wait(0.5) or "ran"))


atexit.register(handler)  # runs first
"""


def test_background_work_an_atexit_handler_submits_finishes_before_finalization():
    """After the main thread ended, the threading exit hook has run already: async_ckpt's
    atexit handler waits for what the handlers before it submitted."""
    assert run_python(_SUBMITTED_BY_AN_ATEXIT_HANDLER) == "ran"


def test_ctrl_c_ends_the_wait_for_background_work_and_nothing_else(monkeypatch):
    """The exit hook returns on Ctrl-C: Python's own shutdown steps after it still run."""
    gate = threading.Event()
    with Workers(1, "background", finish_at_exit=True) as workers:
        held = workers.submit(gate.wait, WAIT_S)

        def interrupted(timeout=None):
            raise KeyboardInterrupt

        monkeypatch.setattr(held, "exception", interrupted)
        threads_mod.finish_background_work()  # returns, does not raise
        assert not held.done()
        gate.set()
    assert held.result(0) is True


def test_a_forked_child_does_not_wait_for_its_parents_background_work():
    """A forked child inherits the parent's Workers but not their threads."""
    gate = threading.Event()
    with Workers(1, "background", finish_at_exit=True) as workers:
        held = workers.submit(gate.wait, WAIT_S)
        try:  # the call is still held: a child waiting for it never ends
            ended = exit_code_of_a_forked_child(WAIT_S)
        finally:
            gate.set()
    assert held.result(0) is True
    assert ended == 0, "the forked child waited for its parent's background work"
