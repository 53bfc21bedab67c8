"""CheckpointManager start-up clean-up: only old incomplete steps go, a read-only root
still restores (issue 13).

A step directory without metadata may be a save another live process is still
writing, so only those untouched for the grace period are removed; a failed
removal (EROFS) is a warning and never stops ``restore()``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from async_ckpt.errors import CheckpointError
from async_ckpt.manager import INCOMPLETE_GRACE_ENV, INCOMPLETE_GRACE_S, CheckpointManager


def _state(value: float = 0.0) -> dict[str, Any]:
    return {"w": torch.full((64,), value), "step": 0}


def _manager(root: Any, **kwargs: Any) -> CheckpointManager:
    kwargs.setdefault("executor", "thread")
    return CheckpointManager(root, **kwargs)


def _committed(root: Path, steps: range) -> None:
    with _manager(root, keep_last=None) as manager:
        for step in steps:
            manager.save(step, {"w": torch.full((64,), float(step)), "step": step})
        manager.wait()


def _incomplete(root: Path, step: int, age_s: float | None) -> Path:
    """A step directory holding a partial data file, last modified ``age_s`` seconds ago
    (None: just now)."""
    path = root / f"step-{step:08d}"
    path.mkdir()
    (path / "0123abcd-r0-0.data").write_bytes(b"partial")
    if age_s is not None:
        _age(path, age_s)
    return path


def _age(path: Path, seconds: float) -> None:
    stamp = time.time() - seconds
    for folder, _, names in os.walk(path):
        for name in names:
            os.utime(os.path.join(folder, name), (stamp, stamp))
        os.utime(folder, (stamp, stamp))


@pytest.fixture(autouse=True)
def _no_grace_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INCOMPLETE_GRACE_ENV, raising=False)


def test_old_incomplete_step_removed_fresh_one_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _committed(tmp_path, range(1, 3))
    old = _incomplete(tmp_path, 3, 2 * INCOMPLETE_GRACE_S)
    fresh = _incomplete(tmp_path, 4, None)  # another process may be writing it right now
    # an old file, but a file written just now: the newest file decides
    mixed = _incomplete(tmp_path, 5, 2 * INCOMPLETE_GRACE_S)
    (mixed / "0123abcd-r0-1.data").write_bytes(b"being written")
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        manager = _manager(tmp_path)
    with manager:
        assert not old.exists()
        assert (fresh / "0123abcd-r0-0.data").read_bytes() == b"partial"
        assert sorted(p.name for p in mixed.iterdir()) == [
            "0123abcd-r0-0.data",
            "0123abcd-r0-1.data",
        ]
        assert "removed incomplete checkpoint" in caplog.text and "step-00000003" in caplog.text
        kept = [r.getMessage() for r in caplog.records if "kept incomplete" in r.getMessage()]
        assert len(kept) == 2 and "step-00000004" in kept[0] and "step-00000005" in kept[1]
        assert manager.steps() == [1, 2]
        restored = _state()
        assert manager.restore(restored) == 2
        assert torch.equal(restored["w"], torch.full((64,), 2.0))


def test_grace_from_keyword_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _committed(tmp_path, range(1, 2))
    step = _incomplete(tmp_path, 2, 60.0)
    with _manager(tmp_path):  # within the default grace
        assert step.exists()
    monkeypatch.setenv(INCOMPLETE_GRACE_ENV, "30")
    with _manager(tmp_path, incomplete_grace_s=3600):  # the keyword wins over the environment
        assert step.exists()
    with _manager(tmp_path) as manager:
        assert manager.incomplete_grace_s == 30.0
        assert not step.exists()
    monkeypatch.delenv(INCOMPLETE_GRACE_ENV)
    step = _incomplete(tmp_path, 3, 60.0)
    with _manager(tmp_path, incomplete_grace_s=30):
        assert not step.exists()


@pytest.mark.parametrize("value", [-1, "10", float("nan"), True])
def test_invalid_grace_keyword(tmp_path: Path, value: Any) -> None:
    with pytest.raises(CheckpointError, match="incomplete_grace_s"):
        _manager(tmp_path, incomplete_grace_s=value)


def test_invalid_grace_environment_falls_back_to_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(INCOMPLETE_GRACE_ENV, "ten minutes")
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        manager = _manager(tmp_path)
    with manager:
        assert manager.incomplete_grace_s == INCOMPLETE_GRACE_S
    assert INCOMPLETE_GRACE_ENV in caplog.text


def test_read_only_root_still_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _committed(tmp_path, range(1, 3))
    leftover = _incomplete(tmp_path, 3, 2 * INCOMPLETE_GRACE_S)  # old: removal is attempted
    # As root, chmod does not make a directory read-only: fail every deletion under the
    # root the way a read-only mount does (unlink reports EROFS even for a missing file).
    attempts: list[str] = []
    real_unlink, real_rmtree = os.unlink, shutil.rmtree

    def read_only(path: Any) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(str(tmp_path))

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if read_only(path):
            attempts.append(os.fspath(path))
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        real_unlink(path, *args, **kwargs)

    def rmtree(path: Any, ignore_errors: bool = False, *args: Any, **kwargs: Any) -> None:
        if read_only(path):
            attempts.append(os.fspath(path))
            if ignore_errors:
                return
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        real_rmtree(path, ignore_errors, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        manager = _manager(tmp_path, keep_last=1)  # retention would delete step 1 too
        try:
            assert attempts and all(read_only(p) for p in attempts)
            assert leftover.is_dir()
            assert "could not remove incomplete checkpoint" in caplog.text
            assert "step-00000003" in caplog.text
            restored = _state()
            assert manager.restore(restored) == 2
            assert torch.equal(restored["w"], torch.full((64,), 2.0))
            assert restored["step"] == 2
        finally:
            manager.close()  # its retention fails too: logged, not raised
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert manager.steps() == [1, 2]
