"""SaveFuture: the one thing async_save returns."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from ..format.metadata import Metadata


class AwaitableFuture(concurrent.futures.Future):
    """A concurrent.futures.Future that can also be awaited from asyncio code."""

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()


@dataclass
class SaveStats:
    """Figures of one save (seconds, bytes); filled in as the save progresses."""

    checkpoint_id: str = ""
    bytes: int = 0
    copied_bytes: int = 0
    stall_s: float = 0.0  # time the caller was blocked in async_save
    staged_s: float = 0.0  # from the call until the snapshot was complete
    plan_s: float = 0.0
    write_s: float = 0.0
    commit_s: float = 0.0
    total_s: float = 0.0  # from the call until committed
    plan_reused: bool = False
    # CUDA states only: "pinned" (the arena is page-locked: D2H copies at full speed)
    # or "pageable" (registration failed or pin_memory=False: slower copies); else None
    staging_memory: str | None = None

    @property
    def gbps(self) -> float:
        """Bytes written per second of the whole save, in GB/s."""
        return self.bytes / self.total_s / 1e9 if self.total_s > 0 else 0.0

    def line(self) -> str:
        """One human-readable line for logs."""
        return (
            f"saved {self.checkpoint_id}: {self.bytes / 2**20:.1f} MiB, stall {self.stall_s * 1e3:.1f} ms, "
            f"committed after {self.total_s:.2f} s ({self.gbps:.2f} GB/s)"
        )


class SaveFuture:
    """The result of :func:`async_save` and ``AsyncCheckpointer.save``.

    ``result(timeout)`` returns the committed :class:`Metadata` or raises the
    save's error (:class:`SaveFailedError` or a subclass: nothing was
    committed); ``staged`` resolves once the state may be mutated again (at
    once with synchronous staging); ``await fut`` works in asyncio code;
    ``cancel()`` stops a save that has not committed; ``stats`` carries the
    figures (stall, staging, write and commit times, bytes). DCP code finds
    its ``staging_completion`` and ``upload_completion`` here too.

    A future nobody awaits still commits (or fails, logged); await the last
    one before relying on the checkpoint or leaving the process.
    """

    def __init__(self, stats: SaveStats, staged: AwaitableFuture | None = None) -> None:
        self._done = AwaitableFuture()
        self.staged: AwaitableFuture = staged or AwaitableFuture()
        self.stats = stats
        self._cancel_hook: Callable[[], bool] | None = None
        self.save_no: int | None = None  # set by the checkpointer; names the save to abort
        self._handover: Any = None  # the checkpointer's, while the staging thread has it

    # concurrent.futures-style surface
    def result(self, timeout: float | None = None) -> Metadata:
        """Block until committed; returns its metadata or raises its error."""
        return self._done.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._done.exception(timeout)

    def done(self) -> bool:
        return self._done.done()

    def add_done_callback(self, fn: Callable[[SaveFuture], Any]) -> None:
        self._done.add_done_callback(lambda _: fn(self))

    def cancel(self) -> bool:
        """Abort the save; it will not commit. Returns False if it already finished."""
        if self._done.done():
            return False
        return bool(self._cancel_hook and self._cancel_hook())

    def cancelled(self) -> bool:
        return self._done.cancelled()

    def __await__(self) -> Generator[Any, None, Metadata]:
        return self._done.__await__()

    # the two futures of DCP's AsyncSaveResponse, for code written against it
    @property
    def staging_completion(self) -> concurrent.futures.Future:
        """Resolves once the state is staged (DCP's name for :attr:`staged`)."""
        return self.staged

    @property
    def upload_completion(self) -> concurrent.futures.Future:
        """Resolves with the committed :class:`Metadata` (a plain concurrent future)."""
        return self._done

    # for executors
    def _set_result(self, meta: Metadata) -> None:
        if not self._done.done():
            self._done.set_result(meta)

    def _set_exception(self, exc: BaseException) -> None:
        if not self.staged.done():
            self.staged.set_exception(exc)
        if isinstance(exc, concurrent.futures.CancelledError):
            self._set_cancelled()  # cancelled() is True, result() raises CancelledError
        elif not self._done.done():
            self._done.set_exception(exc)

    def _set_cancelled(self) -> None:
        if not self._done.done():
            self._done.cancel()
            self._done.set_running_or_notify_cancel()


def settle(future: SaveFuture, timeout: float | None, forget: Callable[[], None]) -> bool:
    """Wait for ``future``, a caller's pending save, and say how it ended.

    True: it committed (the caller records it, then calls ``forget``). False: it
    was cancelled; ``forget`` was called. Its error is raised once, after
    ``forget``. A wait that times out raises and forgets nothing: the save goes on.
    """
    try:
        future.result(timeout)
    except BaseException as exc:
        if not future.done():
            raise
        forget()
        if isinstance(exc, concurrent.futures.CancelledError):
            return False
        raise
    return True
