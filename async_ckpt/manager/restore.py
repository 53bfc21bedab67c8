"""Where a CheckpointManager restores from: the memory tier or the root.

The memory tier wins when every rank can get a step from it at least as new as
storage's newest (exactly the step asked for, if one is); else the step is
loaded from its directory under the root.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from ..api import load
from ..errors import CheckpointNotFoundError
from ..executor import AsyncCheckpointer
from ..planning.keys import KeyCheck
from ..storage.detect import detect_reader
from .memory_restore import RestoreInfo
from .memory_tier import MemoryTier
from .options import check_step
from .root import StepStore


def restore_step(
    state: Mapping[str, Any],
    step: int | None,
    strict: KeyCheck,
    allow_lossy_cast: bool,
    *,
    store: StepStore,
    memory: MemoryTier | None,
    checkpointer: AsyncCheckpointer,
    storage_options: dict[str, Any] | None,
    latest_step: Callable[[], int | None],
) -> RestoreInfo:
    """Load ``step`` (None: the newest) into ``state`` in place; where it came from.

    Collective with the memory tier or several ranks: every rank calls it together.
    """
    t0 = time.perf_counter()
    if memory is not None:
        storage_step = latest_step() if step is None else None
        info = memory.restore(state, storage_step, step, strict, allow_lossy_cast)
        if info is not None:
            return info
    if step is None:
        step = latest_step()
        if step is None:
            raise CheckpointNotFoundError(
                f"no committed checkpoint under {store.root!r}"
                + (
                    " nor in the memory tier; start from scratch (catch this error)"
                    if memory is not None
                    else "; start from scratch "
                    "(check manager.latest_step() is not None before restoring)"
                )
            )
    cid = store.checkpoint_id(check_step(step))
    load(
        state,
        storage_reader=detect_reader(cid, storage_options),
        strict=strict,
        allow_lossy_cast=allow_lossy_cast,
        process_group=checkpointer.process_group,
        no_dist=not checkpointer.distributed,
    )
    return RestoreInfo(step, "storage", time.perf_counter() - t0)
