"""The checkpoint ids this process is writing now, for deletes that must not race them.

Every ``AsyncCheckpointer.save`` registers its id from the call until its
future is done (committed, failed or cancelled); :func:`async_ckpt.delete`
refuses an id on the list. Ids are compared in a canonical spelling (a local
path made absolute, a URL without trailing slashes).
"""

from __future__ import annotations

import os
import threading
from collections import Counter

_WRITING: Counter[str] = Counter()
_LOCK = threading.Lock()


def canonical(checkpoint_id: str | os.PathLike) -> str:
    """One spelling per checkpoint: absolute and normalised for local paths."""
    text = os.fspath(checkpoint_id)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    if "://" in text:
        return text.rstrip("/")
    return os.path.realpath(text)


def started(checkpoint_id: str) -> str:
    key = canonical(checkpoint_id)
    with _LOCK:
        _WRITING[key] += 1
    return key


def finished(key: str) -> None:
    with _LOCK:
        _WRITING[key] -= 1
        if _WRITING[key] <= 0:
            del _WRITING[key]


def is_writing(checkpoint_id: str | os.PathLike) -> bool:
    """Whether a save of this process is writing ``checkpoint_id`` now."""
    with _LOCK:
        return _WRITING.get(canonical(checkpoint_id), 0) > 0
