"""Storage faults during saves: a full disk, flaky storage, and the retry policy.

The same four checks as tests/test_faults.py (killed processes): the failing
save reports a clear error; every checkpoint committed before it still loads
bit-exact; nothing the failed save half-wrote loads (IncompleteCheckpointError)
or survives the next successful commit to the same id; and the next save works.
Transient errors are retried a bounded number of times, permanent ones never.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from faulty_storage import (
    SHAPES,
    FlakyWriter,
    NoSpaceWriter,
    assert_loads_exactly,
    assert_only_committed_files,
    clone,
    committed,
    data_files,
    fill_,
    new_state,
)
from faulty_storage import tests_on_worker_path as _let_workers_import_tests
from helpers import random_tensor

import async_ckpt
from async_ckpt import FileSystemWriter, IncompleteCheckpointError, SaveFailedError
from async_ckpt.storage.retry import RetryPolicy, call_with_retry, is_transient

pytestmark = pytest.mark.multiprocess
_let_workers_import_tests()


def calls(log_dir: Path) -> list[str]:
    """The data files a logging writer was asked to write, one entry per call."""
    path = log_dir / "calls"
    return path.read_text().split() if path.exists() else []


# ---------------------------------------------------------------------------- disk full


def test_disk_full_mid_write_fails_clearly_and_removes_the_partial_file(ckpt, tmp_path):
    earlier, path, log = tmp_path / "earlier", tmp_path / "full", tmp_path / "log"
    log.mkdir()
    state = {"w": random_tensor(torch.float32, (1 << 18,), seed=3)}  # one tensor: one file
    before = committed(ckpt, state, earlier)
    state["w"].add_(1)
    fut = ckpt.save(state, storage_writer=NoSpaceWriter(path, log_dir=log, fail_after=100_000))
    with pytest.raises(OSError, match="No space left on device") as info:
        fut.result(timeout=60)
    assert info.value.errno == errno.ENOSPC
    assert len(calls(log)) == 1  # never retried
    assert data_files(path) == set()  # the partial file went with the failure
    with pytest.raises(IncompleteCheckpointError):
        async_ckpt.load({"w": torch.zeros(1 << 18)}, checkpoint_id=path)
    assert_loads_exactly(earlier, before)
    after = committed(ckpt, state, path)
    assert_loads_exactly(path, after)
    assert_only_committed_files(path)


def test_disk_full_in_one_of_four_files_removes_every_file_of_the_failed_save(ckpt, tmp_path):
    """The worker-process path of tests/test_commit.py's synchronous sibling-file test."""
    path, log = tmp_path / "ckpt", tmp_path / "log"
    log.mkdir()
    state = fill_(new_state(), 1)
    fut = ckpt.save(state, storage_writer=NoSpaceWriter(path, log_dir=log, files=1))
    with pytest.raises(OSError, match="No space left"):
        fut.result(timeout=60)
    assert len(calls(log)) == len(SHAPES)  # the other three files were written, then removed
    assert data_files(path) == set()
    with pytest.raises(IncompleteCheckpointError):
        async_ckpt.load(clone(state), checkpoint_id=path)
    after = committed(ckpt, fill_(state, 2), path)
    assert_loads_exactly(path, after)
    assert_only_committed_files(path)


@pytest.fixture
def small_fs(tmp_path):
    """A 6 MiB tmpfs; skipped where mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    mount = shutil.which("mount")
    if os.name != "posix" or os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a size-limited filesystem needs root")
    point = tmp_path / "small"
    point.mkdir()
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(point)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_really_full_filesystem_fails_the_save_and_keeps_the_committed_one(ckpt, small_fs):
    small = {"w": random_tensor(torch.float32, (1 << 18,), seed=5)}  # 1 MiB
    big = {"w": random_tensor(torch.float32, (2 << 20,), seed=6)}  # 8 MiB: cannot fit
    before = committed(ckpt, small, small_fs / "a")
    fut = ckpt.save(big, storage_writer=FileSystemWriter(small_fs / "b"))
    with pytest.raises(OSError, match="No space left on device") as info:
        fut.result(timeout=60)
    assert info.value.errno == errno.ENOSPC
    assert data_files(small_fs / "b") == set()
    assert_loads_exactly(small_fs / "a", before)
    # The space the partial file took is free again, so the next save fits.
    small["w"].mul_(-1)
    after = committed(ckpt, small, small_fs / "b")
    assert_loads_exactly(small_fs / "b", after)
    assert_loads_exactly(small_fs / "a", before)


# ---------------------------------------------------------------------------- flaky storage


def test_transient_errors_are_retried_until_the_save_commits(ckpt, tmp_path):
    path, log = tmp_path / "ckpt", tmp_path / "log"
    log.mkdir()
    state = {"w": random_tensor(torch.float32, (1 << 16,), seed=7)}
    fut = ckpt.save(state, storage_writer=FlakyWriter(path, log_dir=log, failures=2))
    fut.result(timeout=60)
    assert len(calls(log)) == 3  # two ConnectionResetErrors, then success
    assert_loads_exactly(path, clone(state))
    assert_only_committed_files(path)  # the failed attempts' partial files are gone


def test_a_storage_that_never_recovers_fails_after_bounded_attempts(ckpt, tmp_path):
    earlier, path, log = tmp_path / "earlier", tmp_path / "ckpt", tmp_path / "log"
    log.mkdir()
    state = {"w": random_tensor(torch.float32, (1 << 16,), seed=8)}
    before = committed(ckpt, state, earlier)
    fut = ckpt.save(state, storage_writer=FlakyWriter(path, log_dir=log, failures=-1))
    with pytest.raises(SaveFailedError, match=r"failed 5 time\(s\).*ConnectionResetError") as info:
        fut.result(timeout=60)
    assert info.value.attempts == RetryPolicy().attempts == 5
    assert len(calls(log)) == 5
    assert data_files(path) == set()
    assert_loads_exactly(earlier, before)
    assert_loads_exactly(path, committed(ckpt, state, path))


@pytest.mark.parametrize("error, retried", [("timeout", True), ("EIO", True), ("EAGAIN", True)])
def test_transient_error_kinds_are_retried(tmp_path, monkeypatch, error, retried):
    monkeypatch.setenv("ASYNC_CKPT_WRITE_RETRY_DELAY_S", "0.001")
    log = tmp_path / "log"
    log.mkdir()
    state = {"w": torch.arange(100.0)}
    writer = FlakyWriter(tmp_path / "c", log_dir=log, failures=1, error=error)
    async_ckpt.save(state, storage_writer=writer)  # synchronous: same write path
    assert len(calls(log)) == 2
    assert_loads_exactly(tmp_path / "c", clone(state))


@pytest.mark.parametrize("error", ["ENOSPC", "EACCES", "EROFS", "EDQUOT", "EPERM", "EFBIG"])
def test_permanent_errors_are_not_retried(tmp_path, error):
    log = tmp_path / "log"
    log.mkdir()
    writer = FlakyWriter(tmp_path / "c", log_dir=log, failures=-1, error=error)
    with pytest.raises(OSError) as info:
        async_ckpt.save({"w": torch.arange(100.0)}, storage_writer=writer)
    assert info.value.errno == getattr(errno, error)
    assert len(calls(log)) == 1
    assert data_files(tmp_path / "c") == set()


def test_the_number_of_attempts_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNC_CKPT_WRITE_ATTEMPTS", "2")
    monkeypatch.setenv("ASYNC_CKPT_WRITE_RETRY_DELAY_S", "0")
    log = tmp_path / "log"
    log.mkdir()
    writer = FlakyWriter(tmp_path / "c", log_dir=log, failures=-1)
    with pytest.raises(SaveFailedError, match=r"failed 2 time\(s\)"):
        async_ckpt.save({"w": torch.arange(3.0)}, storage_writer=writer)
    assert len(calls(log)) == 2
    monkeypatch.setenv("ASYNC_CKPT_WRITE_ATTEMPTS", "zero")
    with pytest.raises(async_ckpt.CheckpointError, match="ASYNC_CKPT_WRITE_ATTEMPTS"):
        RetryPolicy.from_env()


def test_retry_classification_and_backoff():
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(OSError(errno.EIO, "I/O error")) and is_transient(BrokenPipeError())
    assert not is_transient(OSError(errno.ENOSPC, "full"))
    assert not is_transient(ConnectionError(errno.EACCES, "refused by policy"))
    assert not is_transient(OSError("no errno")) and not is_transient(ValueError("bug"))
    assert not is_transient(async_ckpt.CheckpointExistsError("exists"))

    waits: list[float] = []
    outcomes = iter([ConnectionResetError(), TimeoutError(), "ok"])

    def flaky():
        got = next(outcomes)
        if isinstance(got, BaseException):
            raise got
        return got

    policy = RetryPolicy(attempts=4, initial_delay_s=1.0, max_delay_s=1.5)
    assert call_with_retry(flaky, what="x", policy=policy, sleep=waits.append) == "ok"
    assert len(waits) == 2 and 0.5 <= waits[0] <= 1.0 and 0.75 <= waits[1] <= 1.5
    assert [policy.delay(n) <= 1.5 for n in range(1, 30)] == [True] * 29
