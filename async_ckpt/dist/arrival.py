"""A bounded wait for every rank to reach the same checkpoint call.

A collective that only some ranks enter waits for the rest until the
group's timeout (30 minutes by default in torch), silently: the classic case
is a framework that calls save on rank 0 only. Before the first collective of
a call, each rank checks in through the group's key-value store; a rank that
waits longer than the arrival timeout raises :class:`RanksMissingError`
naming the ranks that never came, and pointing to ``no_dist=True``.

Costs about three store round trips per call (well under a millisecond on
one host). Calls are numbered per group on every rank, so ranks that make the
same calls in the same order meet under the same key.
"""

from __future__ import annotations

import datetime
import itertools
import os
from typing import Any

from ..errors import RanksMissingError

DEFAULT_ARRIVAL_TIMEOUT_S = 300.0
ARRIVAL_TIMEOUT_ENV = "ASYNC_CKPT_ARRIVAL_TIMEOUT_S"

_calls: dict[str, itertools.count] = {}


def arrival_timeout() -> float:
    """Seconds a rank waits for the others at a checkpoint call (env override)."""
    raw = os.environ.get(ARRIVAL_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_ARRIVAL_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{ARRIVAL_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def wait_for_ranks(
    store: Any,
    scope: str,
    rank: int,
    world_size: int,
    what: str,
    timeout_s: float | None = None,
) -> None:
    """Return once all ``world_size`` ranks of ``scope`` reached this call; else raise.

    ``store`` is a torch.distributed Store shared by the ranks; ``scope`` names
    the group (equal on its ranks). Raises RanksMissingError after
    ``timeout_s`` (default: :func:`arrival_timeout`) naming the missing ranks.
    """
    if world_size <= 1:
        return
    timeout_s = arrival_timeout() if timeout_s is None else timeout_s
    call = next(_calls.setdefault(scope, itertools.count()))
    base = f"async_ckpt/arrival/{scope}/{call}"
    store.set(f"{base}/rank{rank}", b"1")
    if store.add(f"{base}/count", 1) == world_size:
        store.set(f"{base}/all", b"1")  # the last to arrive lets everyone go
    try:
        store.wait([f"{base}/all"], datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # the store raises a plain RuntimeError/DistStoreError on timeout
        missing = [r for r in range(world_size) if not store.check([f"{base}/rank{r}"])]
        if not missing:  # everyone came just as the wait gave up
            return
        raise RanksMissingError(
            f"rank {rank}: {what} is a collective call, but rank(s) {missing} of "
            f"{world_size} did not call it within {timeout_s:g} s (set "
            f"{ARRIVAL_TIMEOUT_ENV} to wait longer). Call it on every rank, or pass "
            "no_dist=True where only some ranks save or load (e.g. rank 0 under DDP).",
            missing=missing,
        ) from exc


def group_store(process_group: Any) -> tuple[Any, str] | None:
    """The default group's store and a scope naming ``process_group``; None if torch hides it."""
    import torch.distributed as dist

    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return None
    ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
    scope = "world" if process_group is None else "g" + "-".join(map(str, ranks))
    return store, scope


def check_in(comm: Any, what: str) -> None:
    """:func:`wait_for_ranks` on a comm that knows its store (a GroupComm); else nothing."""
    if getattr(comm, "store", None) is not None and comm.world_size > 1:
        wait_for_ranks(comm.store, comm.arrival_scope, comm.rank, comm.world_size, what)
