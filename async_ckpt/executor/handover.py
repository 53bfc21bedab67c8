"""A save on its way to the staging thread (async staging, after the first save):
what that thread needs, and the lock that decides between its hand-off and an abort."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ..pipeline.incremental import Incremental
from ..staging.snapshot import Snapshot
from ..storage.base import StorageWriter
from .base import Executor


class Handover:
    """A save between its call and its hand-off on the staging thread: what the thread
    needs, and whether it was handed to the executor or aborted (cancel, timeout) first."""

    def __init__(
        self,
        state_dict: Mapping[str, Any],
        states: dict[str, Any],
        writer: StorageWriter,
        executor: Executor,
        started: float,
        extra: dict[str, Any],
        incremental: Incremental | None,
    ) -> None:
        self.state_dict, self.states, self.writer = state_dict, states, writer
        self.executor, self.started, self.extra = executor, started, extra
        self.incremental = incremental
        self.lock = threading.Lock()
        self.submitted = False
        self.aborted = False
        self.passed = False  # counted out of the checkpointer's saves queued on the thread


def drop(snapshot: Snapshot, exc: BaseException) -> None:
    """A snapshot that will never be filled: its buffer goes back, and the next stage
    (which waits for this one's ``staged``) goes on."""
    snapshot.release()
    if not snapshot.staged.done():
        snapshot.staged.set_exception(exc)
