"""Checks of CheckpointManager's arguments: each raises CheckpointError naming the bad one."""

from __future__ import annotations

import os

from ..errors import CheckpointError
from ..settings import env_seconds
from .retention import INCOMPLETE_GRACE_ENV, INCOMPLETE_GRACE_S


def positive(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise CheckpointError(f"{name} must be a positive integer or None, not {value!r}")
    return value


def grace(value: float | None) -> float:
    """The grace period for incomplete steps: ``value``, else the environment, else the default."""
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise CheckpointError(
                f"incomplete_grace_s must be a non-negative number of seconds, not {value!r}"
            )
        return float(value)
    return env_seconds(INCOMPLETE_GRACE_ENV, INCOMPLETE_GRACE_S)


def check_metric(metric: str | None, mode: str, keep_best: int | None) -> str | None:
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise CheckpointError(
            f"metric must be a non-empty string (a key of metrics), not {metric!r}"
        )
    if mode not in ("min", "max"):
        raise CheckpointError(f"mode must be 'min' or 'max', not {mode!r}")
    if keep_best is not None and metric is None:
        raise CheckpointError(
            "keep_best needs the metric to rank by: CheckpointManager(keep_best=k, metric='loss', "
            "mode='min'), and save(step, state, metrics={'loss': ...})"
        )
    return metric


def check_memory(
    memory_every: int | None, save_every: int | None, keep: int, ranks_per_node: int | None
) -> None:
    if memory_every is not None and save_every is not None and memory_every > save_every:
        raise CheckpointError(
            f"memory_every={memory_every} is larger than save_every={save_every}: the memory "
            "tier holds the newest snapshots, so it saves at least as often as storage"
        )
    positive("memory_keep", keep)
    if keep is None:
        raise CheckpointError("memory_keep must be a positive integer")
    positive("ranks_per_node", ranks_per_node)


def env_ranks_per_node() -> int | None:
    """torchrun's LOCAL_WORLD_SIZE: how many ranks share a node."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step must be a non-negative integer, not {step!r}")
    return step
