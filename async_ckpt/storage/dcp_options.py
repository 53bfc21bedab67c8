"""DCP's storage-writer options that mean nothing here: accepted, with one warning each.

Code written for torch.distributed.checkpoint passes them to its
``FileSystemWriter``/``FsspecWriter``; the same call on ours must work.
"""

from __future__ import annotations

import warnings
from typing import Any

_NOT_SET: Any = object()
"""Default of an accepted-but-ignored option: tells "not passed" from any value."""

WHY_IGNORED = {
    "single_file_per_rank": "each rank writes one data file per writer thread "
    "(thread_count), whatever this says",
    "per_thread_copy_ahead": "data files are written straight from the staged "
    "snapshot, so there is no copy ahead to bound",
    "cache_staged_state_dict": "staging memory is always kept and reused between "
    "saves (async_ckpt.Stager)",
    "sync_files": "an object store makes an upload durable when it completes",
    "serialization_format": "async_ckpt writes its own format (docs/FORMAT.md)",
    "_extensions": "stream transforms (e.g. compression) are not supported; data "
    "is stored raw with CRC-32C checksums",
}


def warn_no_effect(option: str, why: str, stacklevel: int = 3) -> None:
    """One warning for a DCP option that has no effect here, saying why."""
    warnings.warn(
        f"{option} has no effect in async_ckpt: {why}", UserWarning, stacklevel=stacklevel
    )


def warn_ignored(**given: Any) -> None:
    """Warn once for each DCP writer option actually passed (not left at ``_NOT_SET``)."""
    for option, value in given.items():
        if value is not _NOT_SET:
            warn_no_effect(f"{option}={value!r}", WHY_IGNORED[option], stacklevel=4)


def checkpoint_id_or_path(checkpoint_id: Any, path: Any) -> Any:
    """The location a storage class was given: ours (``checkpoint_id``) or DCP's ``path=``."""
    if checkpoint_id is not None and path is not None:
        raise TypeError("pass the location once: checkpoint_id (positional) or path=, not both")
    if checkpoint_id is None and path is None:
        raise TypeError("missing the checkpoint location: pass it first, or as path=")
    return checkpoint_id if checkpoint_id is not None else path
