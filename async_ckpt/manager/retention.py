"""What a CheckpointManager keeps and what it removes.

Retention keeps the newest committed steps, every ``keep_every``-th and the
``keep_best`` steps with the best metric; the clean-up at start removes step
directories a crash left without metadata, but only once they are older than a
grace period (a younger one may be a save another live process still writes).
Steps a manager of this process is saving are never removed by either.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .root import StepStore

if TYPE_CHECKING:
    from .metrics import StepMetrics

log = logging.getLogger("async_ckpt")

INCOMPLETE_GRACE_S = 600.0
"""Default age (seconds since the newest file in it was modified) before a manager
starting up removes a step directory without metadata: a younger one may be a save
that another live process (an orphaned worker of a killed job, another job) is still
writing. Overridden by ``CheckpointManager(incomplete_grace_s=...)`` or the
environment variable named by :data:`INCOMPLETE_GRACE_ENV`."""
INCOMPLETE_GRACE_ENV = "ASYNC_CKPT_INCOMPLETE_GRACE_S"

# Checkpoint ids some manager of this process is writing right now: never cleaned up.
_IN_FLIGHT: set[str] = set()
_IN_FLIGHT_LOCK = threading.Lock()


def steps_to_keep(
    committed: list[int],
    keep_last: int | None,
    keep_every: int | None,
    newest_saved: int | None,
    best: Iterable[int] = (),
) -> set[int]:
    """The committed steps (oldest first) retention keeps: the ``keep_last`` newest
    (all if None), the newest always, multiples of ``keep_every``, the step this
    manager committed last, and ``best`` (see :func:`best_steps`)."""
    keep = set(committed if keep_last is None else committed[-keep_last:])
    keep.add(committed[-1])
    if keep_every is not None:
        keep.update(s for s in committed if s % keep_every == 0)
    if newest_saved is not None:
        keep.add(newest_saved)
    keep.update(s for s in best if s in committed)
    return keep


def metric_value(metrics: Mapping[str, Any] | None, metric: str) -> float | None:
    """``metrics[metric]`` as a number; None when it is missing or not a finite number
    (a step without the metric is never among the best)."""
    if not isinstance(metrics, Mapping):
        return None
    value = metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def best_steps(values: Mapping[int, float], k: int, mode: Literal["min", "max"]) -> list[int]:
    """The ``k`` steps with the best value, best first: lowest for ``"min"``, highest
    for ``"max"``; of equal values the newer step ranks first."""
    sign = 1.0 if mode == "min" else -1.0
    return sorted(values, key=lambda step: (sign * values[step], -step))[:k]


def in_flight(identity: str, writing_now: bool) -> None:
    """Mark (or unmark) a step directory as being written by a manager of this process."""
    with _IN_FLIGHT_LOCK:
        if writing_now:
            _IN_FLIGHT.add(identity)
        else:
            _IN_FLIGHT.discard(identity)


def writing() -> set[str]:
    """The step directories managers of this process are writing now."""
    with _IN_FLIGHT_LOCK:
        return set(_IN_FLIGHT)


def remove_incomplete(store: StepStore, grace_s: float) -> None:
    """Remove step directories without metadata older than the grace period.

    Failures are logged as warnings: on a read-only root the manager must
    still start, so that ``restore()`` works.
    """
    busy = writing()
    for step, committed in sorted(store.scan().items()):
        if committed or store.identity(step) in busy:
            continue
        cid = store.checkpoint_id(step)
        try:
            mtime = store.info(step, False).mtime
            age = None if mtime is None else time.time() - mtime
            if age is None or age < grace_s:
                log.warning(
                    "kept incomplete checkpoint %s (no metadata.json): %s, so another "
                    "process may still be writing it",
                    cid,
                    "the storage reports no modification time"
                    if age is None
                    else f"it was modified {age:.0f} s ago, within the grace period of "
                    f"{grace_s:g} s ({INCOMPLETE_GRACE_ENV})",
                )
                continue
            store.remove(step)
            if step in store.scan():  # the local removal ignores errors deep inside
                raise OSError(f"{cid} is still there after its removal")
        except Exception as exc:  # OSError (EROFS, EACCES) or an fsspec backend's error
            log.warning("could not remove incomplete checkpoint %s: %s", cid, exc)
            continue
        log.warning(
            "removed incomplete checkpoint %s: it has no metadata.json, so its save never "
            "committed (left by a crash or a failed save)",
            cid,
        )


@dataclass(frozen=True)
class Policy:
    """A manager's retention options (see :class:`CheckpointManager`)."""

    keep_last: int | None
    keep_every: int | None
    keep_best: int | None
    mode: Literal["min", "max"]


def remove_unkept(
    store: StepStore, metrics: StepMetrics, policy: Policy, newest_saved: int | None
) -> list[int]:
    """Remove the committed steps ``policy`` does not keep, and failed saves' leftovers
    older than the newest commit; returns the removed committed steps.

    ``newest_saved`` (committed last by this manager) and steps being written are
    always kept. The caller holds the manager's lock.
    """
    found = store.scan()
    committed = sorted(s for s, done in found.items() if done)
    if not committed:
        return []
    best: list[int] = []
    if policy.keep_best is not None:
        values, unknown = metrics.values(committed)
        # a step whose metric could not be read might be among the best: kept
        best = best_steps(values, policy.keep_best, policy.mode) + sorted(unknown)
    keep = steps_to_keep(committed, policy.keep_last, policy.keep_every, newest_saved, best)
    busy = writing()
    removed = []
    for step in committed:
        if step in keep or store.identity(step) in busy:
            continue
        store.remove(step)
        metrics.forget(step)
        removed.append(step)
        log.info(
            "removed checkpoint %s (keep_last=%s, keep_every=%s, keep_best=%s)",
            store.checkpoint_id(step),
            policy.keep_last,
            policy.keep_every,
            policy.keep_best,
        )
    # A failed save's directory is not written any more once a later save committed.
    for step in sorted(s for s, done in found.items() if not done and s < committed[-1]):
        if store.identity(step) not in busy:
            store.remove(step)
            log.info("removed %s, left by a failed save", store.checkpoint_id(step))
    return removed
