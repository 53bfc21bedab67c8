"""Plain threads for the library's parallel and background work.

Why not ``concurrent.futures.ThreadPoolExecutor``: once the main thread ends,
Python's thread pools refuse new work ("cannot schedule new futures after
interpreter shutdown"), so a load or a save made from an ``atexit`` handler
failed. Some Pythons (3.12.0-3.12.2) start no thread at all once the main
thread has ended: where a thread cannot start, the work here runs on the
calling thread instead (slower, but it gets done). Whoever submits work here
waits for it, so nothing is left running when the interpreter finalizes; the
background work nobody waits for (``Workers(finish_at_exit=True)``) is
waited for when the main thread ends.
Saves in flight when the main thread ends are waited for before the
``atexit`` handlers run (``executor/at_exit.py``), as Python waits for a
thread pool's work.

Every wait here also outlasts Ctrl-C (re-raised once the threads ended): the
threads read or fill buffers that the caller may free as soon as it returns.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future
from typing import Any, TypeVar

T = TypeVar("T")


def usable_cores() -> int:
    """The cores this process may run on (a container's share, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def join_all(threads: Sequence[threading.Thread]) -> None:
    """Wait for every thread but the calling one to end, even through Ctrl-C or a
    signal handler's ``sys.exit`` (re-raised after)."""
    interrupted: BaseException | None = None
    me = threading.current_thread()
    for t in threads:
        while t is not me:
            try:
                t.join()
                break
            except BaseException as exc:  # Ctrl-C, or a signal handler's exit: wait, then raise
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def wait_all(futures: Iterable[Future]) -> None:
    """Wait for every future, even through an interrupt or a failure; then raise the
    interrupt, or the error of the first future (in order) that failed."""
    interrupted: BaseException | None = None
    first_error: BaseException | None = None
    for f in futures:
        while True:
            try:
                error = f.exception()
                break
            except CancelledError as exc:
                error = exc
                break
            except BaseException as exc:  # Ctrl-C while waiting: wait, then raise
                interrupted = interrupted or exc
        first_error = first_error or error
    if interrupted is not None:
        raise interrupted
    if first_error is not None:
        raise first_error


def start_thread(target: Callable[..., None], name: str, *args: Any) -> threading.Thread | None:
    """A started daemon thread, or None where no thread can start (interpreter exit
    on some Python versions, or the process's thread limit)."""
    t = threading.Thread(target=target, args=args, name=name, daemon=True)
    try:
        t.start()
    except RuntimeError:  # "can't create new thread at interpreter shutdown" / "can't start"
        return None
    return t


def run_in_threads(calls: Sequence[Callable[[], None]], name: str) -> None:
    """Run each call on a thread of its own, the last one on this thread (which would
    only wait), and on this thread too where none can start; once all have ended,
    raise the error of the lowest-numbered call that failed."""
    errors: list[BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            calls[i]()
        except BaseException as exc:
            errors[i] = exc

    started: list[threading.Thread] = []
    try:
        for i in range(len(calls)):
            t = start_thread(run, f"{name}-{i}", i) if i < len(calls) - 1 else None
            if t is None:
                run(i)
            else:
                started.append(t)
    finally:
        join_all(started)
    for error in errors:
        if error is not None:
            raise error


def run_jobs(
    fn: Callable[[T], None],
    jobs: Sequence[T],
    threads: int,
    name: str,
    here: Callable[[], None] | None = None,
) -> None:
    """``fn(job)`` for every job, on up to ``threads`` threads taking the jobs in order
    (on this thread where none can start); ``here()`` runs on the calling thread
    meanwhile. After the first failure, or Ctrl-C here, no thread takes a new job.
    Returns once every thread ended; raises ``here``'s error, else the first job's."""
    errors: list[BaseException] = []
    lock = threading.Lock()
    cursor = iter(range(len(jobs)))

    def take() -> int | None:
        with lock:
            return None if errors else next(cursor, None)

    def fail(exc: BaseException) -> None:
        with lock:
            errors.append(exc)  # the threads stop taking jobs

    def work() -> None:
        while (i := take()) is not None:
            try:
                fn(jobs[i])
            except BaseException as exc:
                fail(exc)

    started: list[threading.Thread] = []
    here_error: BaseException | None = None
    try:
        for n in range(min(threads, len(jobs))):
            t = start_thread(work, f"{name}-{n}")
            if t is None:
                break
            started.append(t)
        if here is not None:
            here()
        if not started:
            work()  # no thread could start: the jobs run here
    except BaseException as exc:  # Ctrl-C too: the threads stop, then it is raised
        here_error = exc
        fail(exc)
    finally:
        join_all(started)
    if here_error is not None:
        raise here_error
    if errors:
        raise errors[0]


class Workers:
    """Up to ``threads`` daemon threads that run submitted calls in submission order,
    each with a Future: a ``ThreadPoolExecutor`` that still takes work at exit.

    Threads start with the first submissions, as a pool's do. ``shutdown()`` (or
    leaving the ``with`` block) runs what is queued, then ends the threads and
    waits for them; a Workers dropped without it ends its idle threads.

    ``finish_at_exit``: for background work nobody waits for (a memory-tier
    replication, a checkpoint removal): what was submitted is finished when the
    main thread ends, before the ``atexit`` handlers, as Python does for a
    thread pool's work, and what an ``atexit`` handler submitted is finished
    after the handlers (:func:`finish_background_work`); else daemon threads
    would die with it at finalization.
    """

    def __init__(
        self,
        threads: int,
        name: str,
        *,
        run_here_if_no_thread: bool = True,
        finish_at_exit: bool = False,
    ) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._finish_at_exit = finish_at_exit
        self._run_here = run_here_if_no_thread
        self._size = max(1, threads)
        self._name = name
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        # The threads hold the queue, not this object, so a dropped Workers is collected.
        # Not at exit: atexit handlers (a save in flight, a load) still submit work then.
        weakref.finalize(self, _stop, self._calls, self._threads).atexit = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``. Where no thread runs and none can start, the call runs
        here and now (``run_here_if_no_thread``), or this raises RuntimeError."""
        done: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("submit() after shutdown()")
            if len(self._threads) < self._size:
                name = f"{self._name}-{len(self._threads)}"
                t = start_thread(_serve, name, self._calls)
                if t is not None:
                    self._threads.append(t)
            if self._threads:
                if self._finish_at_exit:
                    _track_background(done)
                self._calls.put((done, fn, args))  # under the lock: never behind the stops
                return done
            if not self._run_here:
                raise RuntimeError(
                    f"no {self._name} thread can start (interpreter exit on some Python "
                    "versions, or the process's thread limit)"
                )
        _run_call((done, fn, args))  # here, outside the lock: the call may use this Workers
        return done

    def shutdown(self) -> None:
        """Run the calls already queued, then end the threads; idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                _stop(self._calls, self._threads)
        join_all(self._threads)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# The unfinished calls of every Workers(finish_at_exit=True): tracked by call, not by
# Workers, so that a Workers dropped with work queued is still waited for.
_BACKGROUND: set[Future] = set()
_BACKGROUND_LOCK = threading.Lock()


def _track_background(call: Future) -> None:
    with _BACKGROUND_LOCK:
        _BACKGROUND.add(call)
    call.add_done_callback(_untrack_background)


def _untrack_background(call: Future) -> None:
    with _BACKGROUND_LOCK:
        _BACKGROUND.discard(call)


def _forget_parents_background_work() -> None:
    """In a forked child: the parent's calls run on threads the child does not have
    (and the lock may have been held by one of them)."""
    global _BACKGROUND_LOCK
    _BACKGROUND_LOCK = threading.Lock()
    _BACKGROUND.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parents_background_work)


def finish_background_work() -> None:
    """Wait for the unfinished calls of every ``Workers(finish_at_exit=True)``, including
    those they submit meanwhile. At exit: when the main thread ends (before the atexit
    handlers) and after the atexit handlers that may have submitted more. Ctrl-C ends
    the wait and nothing else: the rest of the interpreter's shutdown still runs."""
    try:
        while True:
            with _BACKGROUND_LOCK:
                calls = list(_BACKGROUND)
            if not calls:
                return
            for call in calls:
                try:
                    call.exception()
                except CancelledError:
                    pass
    except BaseException:  # Ctrl-C (or a signal handler's exit) while waiting
        return


try:  # where concurrent.futures waits for a pool's work
    threading._register_atexit(finish_background_work)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):  # not this Python; or imported during exit
    pass


def _serve(calls: queue.SimpleQueue) -> None:
    while (call := calls.get()) is not None:
        _run_call(call)
        del call  # what the call referenced (buffers) goes with it


def _run_call(call: tuple[Future, Callable[..., Any], tuple]) -> None:
    done, fn, args = call
    if done.set_running_or_notify_cancel():
        try:
            done.set_result(fn(*args))
        except BaseException as exc:
            done.set_exception(exc)


def _stop(calls: queue.SimpleQueue, threads: list[threading.Thread]) -> None:
    for _ in threads:
        calls.put(None)


__all__ = [
    "Workers",
    "finish_background_work",
    "join_all",
    "run_in_threads",
    "run_jobs",
    "start_thread",
    "usable_cores",
    "wait_all",
]
