"""Plain threads for the library's parallel and background work.

Why not ``concurrent.futures.ThreadPoolExecutor``: once the main thread ends,
Python's thread pools refuse new work ("cannot schedule new futures after
interpreter shutdown") before the ``atexit`` handlers run. A load or a save
made from an ``atexit`` handler failed then, and so did the writes of a
thread-executor save still in flight when ``AsyncCheckpointer`` closes at exit
(it waits for that save). Plain daemon threads keep running until the
handlers are done; whoever submits work here waits for it, so nothing is
left running when the interpreter finalizes.

Every wait here also outlasts Ctrl-C (re-raised once the threads ended): the
threads read or fill buffers that the caller may free as soon as it returns.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future
from typing import Any, TypeVar

T = TypeVar("T")


def join_all(threads: Sequence[threading.Thread]) -> None:
    """Wait for every thread to end, even through an interrupt (re-raised after)."""
    interrupted: BaseException | None = None
    for t in threads:
        while True:
            try:
                t.join()
                break
            except BaseException as exc:  # Ctrl-C: wait, then raise
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


def run_in_threads(calls: Sequence[Callable[[], None]], name: str) -> None:
    """Run each call on a thread of its own; once all have ended, raise the error of the
    lowest-numbered call that failed."""
    errors: list[BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            calls[i]()
        except BaseException as exc:
            errors[i] = exc

    started: list[threading.Thread] = []
    try:
        for i in range(len(calls)):
            t = threading.Thread(target=run, args=(i,), name=f"{name}-{i}", daemon=True)
            t.start()
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
    """``fn(job)`` for every job, on up to ``threads`` threads taking the jobs in order;
    ``here()`` runs on the calling thread meanwhile. After the first failure no thread
    takes a new job. Returns once every thread ended; raises the first failure
    (``here``'s before the jobs')."""
    errors: list[BaseException] = []
    lock = threading.Lock()
    cursor = iter(range(len(jobs)))

    def take() -> int | None:
        with lock:
            return None if errors else next(cursor, None)

    def work() -> None:
        while (i := take()) is not None:
            try:
                fn(jobs[i])
            except BaseException as exc:
                with lock:
                    errors.append(exc)

    started: list[threading.Thread] = []
    here_error: BaseException | None = None
    try:
        for n in range(min(threads, len(jobs))):
            t = threading.Thread(target=work, name=f"{name}-{n}", daemon=True)
            t.start()
            started.append(t)
        if here is not None:
            try:
                here()
            except Exception as exc:
                here_error = exc
                with lock:
                    errors.append(exc)  # the threads stop taking jobs
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
    """

    def __init__(self, threads: int, name: str) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._size = max(1, threads)
        self._name = name
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        # The threads hold the queue, not this object, so a dropped Workers is collected.
        # Not at exit: atexit handlers (a save in flight, a load) still submit work then.
        weakref.finalize(self, _stop, self._calls, self._threads).atexit = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("submit() after shutdown()")
            if len(self._threads) < self._size:
                n = len(self._threads)
                t = threading.Thread(
                    target=_serve, args=(self._calls,), name=f"{self._name}-{n}", daemon=True
                )
                t.start()  # if it cannot, nothing was queued
                self._threads.append(t)
        done: Future = Future()
        self._calls.put((done, fn, args))
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


def _serve(calls: queue.SimpleQueue) -> None:
    while (call := calls.get()) is not None:
        done, fn, args = call
        if done.set_running_or_notify_cancel():
            try:
                done.set_result(fn(*args))
            except BaseException as exc:
                done.set_exception(exc)
        del call, done, fn, args  # what the call referenced (buffers) goes with it


def _stop(calls: queue.SimpleQueue, threads: list[threading.Thread]) -> None:
    for _ in threads:
        calls.put(None)


__all__ = ["Workers", "join_all", "run_in_threads", "run_jobs", "wait_all"]
