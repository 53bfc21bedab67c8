"""The metrics a CheckpointManager's steps were saved with: checked before a save
stores them, read back from each committed step's metadata once, then remembered."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from ..errors import CheckpointError
from ..pipeline.commit import check_extra
from .retention import best_steps, metric_value
from .root import StepStore

log = logging.getLogger("async_ckpt")


class StepMetrics:
    """Each committed step's metrics (None: saved without), and the ranking by ``metric``.

    Not thread-safe: the manager serialises its calls (under its lock, or from the
    training thread for :meth:`extra`).
    """

    def __init__(
        self,
        store: StepStore,
        metric: str | None,
        mode: Literal["min", "max"],
        keep_best: int | None,
    ) -> None:
        self.store, self.metric, self.mode, self.keep_best = store, metric, mode, keep_best
        self._known: dict[int, dict[str, Any] | None] = {}
        self._warned_no_metric = False

    def of(self, step: int) -> dict[str, Any] | None:
        """``step``'s metrics, remembered or read from its metadata.

        Raises when the metadata cannot be read; a failure is not remembered.
        """
        if step not in self._known:
            self._known[step] = self.store.metrics(step)
        return self._known[step]

    def remember(self, step: int, metrics: Any) -> None:
        """What a commit of this manager stored (its metadata need not be read back)."""
        self._known[step] = metrics if isinstance(metrics, dict) else None

    def forget(self, step: int) -> None:
        self._known.pop(step, None)

    def values(self, committed: list[int]) -> tuple[dict[int, float], set[int]]:
        """``metric`` of each committed step that has it, and the steps whose metadata
        could not be read."""
        assert self.metric is not None
        values, unknown = {}, set()
        for step in committed:
            try:
                value = metric_value(self.of(step), self.metric)
            except Exception as exc:  # damaged, vanished, or the storage failed: unknown
                log.warning(
                    "could not read the metrics of %s: %s", self.store.checkpoint_id(step), exc
                )
                unknown.add(step)
                continue
            if value is not None:
                values[step] = value
        return values, unknown

    def best(self, committed: list[int], k: int) -> list[int]:
        """The ``k`` best of ``committed`` by ``metric``, best first."""
        values, _ = self.values(committed)
        return best_steps(values, k, self.mode)

    def extra(self, step: int, metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """The metadata ``extra`` that stores ``metrics``; CheckpointError if they cannot be
        stored, or if the ranking metric among them is not a number."""
        if metrics is None:
            checked = None
        elif not isinstance(metrics, Mapping):
            raise CheckpointError(f"metrics must be a dict, not {type(metrics).__qualname__}")
        else:
            checked = check_extra({"metrics": metrics})["metrics"]
        if self.metric is None:
            return None if checked is None else {"metrics": checked}
        if checked is not None and self.metric in checked:
            if metric_value(checked, self.metric) is None:
                raise CheckpointError(
                    f"metrics[{self.metric!r}] is {checked[self.metric]!r}: the metric "
                    "checkpoints are ranked by must be a number"
                )
        elif self.keep_best is not None and not self._warned_no_metric:
            self._warned_no_metric = True
            log.warning(
                "step %d is saved without metric %r, so it is never among the keep_best=%d "
                "best; pass metrics={%r: ...} to save/maybe_save (warned once)",
                step,
                self.metric,
                self.keep_best,
                self.metric,
            )
        return None if checked is None else {"metrics": checked}
