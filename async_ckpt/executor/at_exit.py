"""What becomes of the live checkpointers when the interpreter exits.

When the main thread ends, before any ``atexit`` handler, the saves in flight
run to their commit (bounded by each checkpointer's timeout), as Python
finishes a thread pool's work: handlers registered later
(``destroy_process_group``, say) then run after them. The ``atexit`` handler
registered here, when async_ckpt is imported (so after the user's handlers),
closes every checkpointer, then waits for the background work that those
handlers submitted (``async_ckpt.threads.finish_background_work``). Both
skip the checkpointers of another process: a child forked by
``multiprocessing`` (a DataLoader worker) inherits its parent's and runs the
threading exit hooks too.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from typing import TYPE_CHECKING

from ..threads import finish_background_work

if TYPE_CHECKING:
    from .checkpointer import AsyncCheckpointer

_LIVE: weakref.WeakKeyDictionary[AsyncCheckpointer, int] = weakref.WeakKeyDictionary()
"""Each live checkpointer, with the pid of the process that made it."""


def track(ckpt: AsyncCheckpointer) -> None:
    """Finish ``ckpt``'s save in flight and close it at exit (in this process only)."""
    _LIVE[ckpt] = os.getpid()


def _this_process() -> list[AsyncCheckpointer]:
    pid = os.getpid()
    return [ckpt for ckpt, owner in list(_LIVE.items()) if owner == pid]


def _finish_saves_in_flight() -> None:
    """Only waits: another thread may still use a checkpointer; ``close()`` stops a
    save that hangs."""
    for ckpt in _this_process():
        try:
            ckpt._finish_last(stop_if_hung=False)
        except Exception:
            pass


try:  # what concurrent.futures uses to finish a pool's work at the same point
    threading._register_atexit(_finish_saves_in_flight)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):  # not this Python; or imported during exit
    pass


@atexit.register
def _close_all() -> None:
    for ckpt in _this_process():
        try:
            ckpt.close()
        except Exception:
            pass
    # after the closes: background work may wait for a save, which close() bounds
    finish_background_work()  # submitted by atexit handlers (a memory-tier round)
