"""CheckpointManager(keep_best=k, metric=..., mode=...): metrics stored in each checkpoint's
metadata (``extra["metrics"]``), retention keeps best-k with keep_last and keep_every,
a new manager reads the metrics back, ``best_step()``, ``async-ckpt ls`` shows them; and
``AsyncCheckpointer.save(extra=...)`` underneath, through both executors."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import read_meta

import async_ckpt
from async_ckpt.cli import main
from async_ckpt.errors import CheckpointError
from async_ckpt.manager import CheckpointManager
from async_ckpt.manager.retention import best_steps, metric_value, steps_to_keep
from async_ckpt.pipeline.commit import MAX_EXTRA_BYTES


def _state(step: int = 0) -> dict[str, Any]:
    return {"w": torch.full((32,), float(step)), "step": step}


def _manager(root: Any, **kwargs: Any) -> CheckpointManager:
    kwargs.setdefault("executor", "thread")
    return CheckpointManager(root, **kwargs)


LOSSES = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.2, 5: 0.8, 6: 0.6, 7: 0.95}


def _save_all(manager: CheckpointManager, losses: dict[int, float], key: str = "loss") -> None:
    for step, loss in losses.items():
        manager.save(step, _state(step), metrics={key: loss, "lr": 1e-3})
    manager.wait()


# ------------------------------------------------------------------------------ retention


def test_keep_best_min_plus_keep_last(tmp_path: Path) -> None:
    with _manager(tmp_path, keep_last=1, keep_best=2, metric="loss") as manager:
        _save_all(manager, LOSSES)
        assert manager.steps() == [2, 4, 7]  # best two (0.2, 0.5) and the newest
        assert manager.best_step() == 4
        assert manager.metrics(4) == {"loss": 0.2, "lr": 1e-3}
    assert read_meta(tmp_path / "step-00000004")["extra"] == {"metrics": {"loss": 0.2, "lr": 1e-3}}


def test_keep_best_max_with_keep_every(tmp_path: Path) -> None:
    accuracy = {step: 1 - loss for step, loss in LOSSES.items()}
    with _manager(
        tmp_path, keep_last=2, keep_every=3, keep_best=1, metric="acc", mode="max"
    ) as manager:
        _save_all(manager, accuracy, key="acc")
        # best (step 4) | newest two (6, 7) | multiples of 3 (3, 6)
        assert manager.steps() == [3, 4, 6, 7]
        assert manager.best_step() == 4


def test_steps_without_the_metric_are_never_best(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="async_ckpt"),
        _manager(tmp_path, keep_last=1, keep_best=2, metric="loss") as manager,
    ):
        manager.save(1, _state(1), metrics={"loss": 0.5})
        manager.save(2, _state(2))  # no metrics at all
        third = manager.save(3, _state(3), metrics={"acc": 0.1})  # not the ranked one
        manager.save(4, _state(4), metrics={"loss": 0.9})
        manager.save(5, _state(5), metrics={"loss": 1.0})
        manager.wait()
        assert manager.steps() == [1, 4, 5]
        assert third.result().extra == {"metrics": {"acc": 0.1}}
        assert manager.metrics(2) is None  # removed: not committed any more
    warnings = [r for r in caplog.records if "without metric 'loss'" in r.getMessage()]
    assert len(warnings) == 1  # once per manager


def test_restarted_manager_reads_metrics_back(tmp_path: Path) -> None:
    with _manager(tmp_path, keep_last=1, keep_best=2, metric="loss") as manager:
        _save_all(manager, LOSSES)
    with _manager(tmp_path, keep_last=1, keep_best=2, metric="loss") as manager:
        assert manager.best_step() == 4  # from the metadata on disk
        assert manager.metrics(2) == {"loss": 0.5, "lr": 1e-3}
        manager.save(8, _state(8), metrics={"loss": 0.3})
        manager.wait()
        assert manager.steps() == [4, 8]  # 0.3 displaced 0.5 (step 2); 7 was only newest
        manager.save(9, _state(9), metrics={"loss": 0.1})
        manager.wait()
        assert manager.steps() == [4, 9] and manager.best_step() == 9


def test_best_step_without_metric_or_steps(tmp_path: Path) -> None:
    with _manager(tmp_path, metric="loss") as manager:
        assert manager.best_step() is None
        manager.save(1, _state(1))
        manager.wait()
        assert manager.best_step() is None  # a committed step, but without the metric
        assert manager.metrics(1) is None and manager.metrics(2) is None
    with _manager(tmp_path) as manager, pytest.raises(CheckpointError, match="metric="):
        manager.best_step()


def test_metric_without_keep_best_changes_no_retention(tmp_path: Path) -> None:
    with _manager(tmp_path, keep_last=2, metric="loss", mode="max") as manager:
        _save_all(manager, LOSSES)
        assert manager.steps() == [6, 7]
        assert manager.best_step() == 7  # the best of what is left


def test_unreadable_metrics_keep_the_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with _manager(tmp_path, keep_last=1, keep_best=1, metric="loss") as manager:
        _save_all(manager, {1: 0.5, 2: 0.9})
    (tmp_path / "step-00000002" / "metadata.json").write_text("damaged")
    with (
        caplog.at_level(logging.WARNING, logger="async_ckpt"),
        _manager(tmp_path, keep_last=1, keep_best=1, metric="loss") as manager,
    ):
        manager.save(3, _state(3), metrics={"loss": 0.7})
        manager.wait()
        # step 2 might be the best for all the manager can tell: it stays
        assert manager.steps() == [1, 2, 3]
    assert "could not read the metrics of" in caplog.text


def test_maybe_save_stores_metrics_and_checks_them_only_when_saving(tmp_path: Path) -> None:
    with _manager(tmp_path, save_every=2, keep_best=1, metric="loss") as manager:
        assert manager.maybe_save(1, _state(1), metrics={"loss": float("nan")}) is None
        assert manager.maybe_save(2, _state(2), metrics={"loss": 0.25}) is not None
        with pytest.raises(CheckpointError, match="finite"):
            manager.maybe_save(4, _state(4), metrics={"loss": float("inf")})
        manager.wait()
        assert manager.steps() == [2] and manager.metrics(2) == {"loss": 0.25}


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"loss": float("nan")}, "finite"),
        ({"loss": True}, "only finite numbers"),
        ({"loss": torch.tensor(0.5)}, r"\.item\(\)"),
        ({"loss": "low"}, "must be a number"),
        ({"loss": 0.1, 3: 1.0}, "non-empty strings"),
        ({"loss": 0.1, "hist": [1, 2]}, "list"),
        ([("loss", 0.1)], "must be a dict"),
        ({"loss": 0.1, "blob": "x" * MAX_EXTRA_BYTES}, "above the limit"),
    ],
)
def test_invalid_metrics_refused_before_saving(tmp_path: Path, metrics: Any, message: str) -> None:
    with _manager(tmp_path, keep_best=1, metric="loss") as manager:
        with pytest.raises(CheckpointError, match=message):
            manager.save(1, _state(1), metrics=metrics)
        assert not (tmp_path / "step-00000001").exists()
        manager.save(1, _state(1), metrics={"loss": np.float32(0.5), "epoch": np.int64(3)})
        manager.wait()
        assert manager.metrics(1) == {"loss": 0.5, "epoch": 3}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_best": 2},  # no metric
        {"keep_best": 0, "metric": "loss"},
        {"metric": ""},
        {"metric": 3},
        {"metric": "loss", "mode": "lowest"},
    ],
)
def test_invalid_settings(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(CheckpointError):
        _manager(tmp_path, **kwargs)


def test_selection_rules() -> None:
    values = {1: 0.5, 2: 0.2, 3: 0.2, 4: 0.9}
    assert best_steps(values, 2, "min") == [3, 2]  # equals: the newer first
    assert best_steps(values, 1, "max") == [4]
    assert best_steps({}, 3, "min") == []
    assert steps_to_keep([1, 2, 3, 4], 1, None, None, best=[2, 9]) == {2, 4}
    assert metric_value({"loss": 1}, "loss") == 1.0
    for missing in (None, {}, {"loss": "x"}, {"loss": True}, {"loss": float("nan")}):
        assert metric_value(missing, "loss") is None


# ------------------------------------------------------------------- extra, ls, two ranks


@pytest.mark.multiprocess
def test_extra_through_the_worker_process(tmp_path: Path) -> None:
    extra = {"metrics": {"loss": 0.125}, "run": "r7", "epoch": 3}
    with async_ckpt.AsyncCheckpointer(executor="process") as ckpt:
        meta = ckpt.save(_state(1), checkpoint_id=tmp_path / "a", extra=extra).result()
        with pytest.raises(CheckpointError, match="reserved"):
            ckpt.save(_state(1), checkpoint_id=tmp_path / "b", extra={"source_format": "x"})
        plain = ckpt.save(_state(1), checkpoint_id=tmp_path / "c").result()
    assert meta.extra == extra and read_meta(tmp_path / "a")["extra"] == extra
    assert plain.extra == {} and read_meta(tmp_path / "c")["extra"] == {}


def test_extra_is_copied_at_the_call(tmp_path: Path) -> None:
    metrics = {"loss": 0.5}
    with async_ckpt.AsyncCheckpointer(executor="thread") as ckpt:
        future = ckpt.save(_state(), checkpoint_id=tmp_path / "a", extra={"metrics": metrics})
        metrics["loss"] = 99.0
        assert future.result().extra == {"metrics": {"loss": 0.5}}


def test_ls_shows_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with _manager(tmp_path, keep_last=None) as manager:
        manager.save(10, _state(10), metrics={"loss": 0.123456789, "eval": {"acc": 0.5}})
        manager.save(20, _state(20))
        manager.wait()
    (tmp_path / "step-00000030").mkdir()
    assert main(["ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "status", "size", "modified", "metrics"]
    assert lines[1].split()[-2:] == ["eval.acc=0.5", "loss=0.123457"]
    assert lines[2].split()[1] == "committed" and len(lines[2].split()) == 6  # no metrics
    assert lines[3].split()[:2] == ["step-00000030", "incomplete"]
    (tmp_path / "step-00000010" / "metadata.json").write_text("damaged")
    assert main(["ls", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "?"


def _two_rank_body(rank: int, world_size: int, root: str) -> tuple[Any, ...]:
    with CheckpointManager(
        root, executor="thread", keep_last=1, keep_best=1, metric="loss"
    ) as manager:
        for step, loss in ((1, 0.3), (2, 0.1), (3, 0.2)):
            # each rank measures its own loss; rank 0's is stored and ranks the steps
            manager.save(step, _state(step), metrics={"loss": loss + rank})
        manager.wait()
        return manager.steps(), manager.best_step(), manager.metrics(2)


@pytest.mark.multiprocess
def test_two_ranks_store_and_rank_by_rank0_metrics(tmp_path: Path) -> None:
    from dist_utils import run_ranks

    results = run_ranks(_two_rank_body, 2, str(tmp_path))
    assert results == [([2, 3], 2, {"loss": 0.1})] * 2
    assert json.loads((tmp_path / "step-00000002" / "metadata.json").read_text())["extra"] == {
        "metrics": {"loss": 0.1}
    }
