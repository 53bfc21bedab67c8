"""Pausing Python's cyclic garbage collector while a save walks a big state.

Describing and copying 100,000 tensors allocates hundreds of thousands of
small objects; each allocation burst triggers collections that traverse every
live object (the model's tensors included). Measured at 100k tensors: flatten
0.87 s with the collector on, 0.20-0.27 s with it paused; the copy 1.5 s
against 0.5 s. Nothing here makes reference cycles that need the collector
before the walk ends, so it is paused for the walk and restored after.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0  # walks in progress, over all threads
_we_disabled = False  # whether the collector was on when the first walk began


@contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic collections inside (re-entrant, thread-safe); the caller's
    setting is restored when the last paused walk ends."""
    global _depth, _we_disabled
    with _lock:
        if _depth == 0:
            _we_disabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _we_disabled:
                gc.enable()
