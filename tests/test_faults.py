"""Faults during saves: killed worker, killed training job, full disk, flaky storage.

Every fault test checks the same four things: the failing save reports a clear
error; every checkpoint committed before it still loads bit-exact; nothing the
failed save half-wrote loads (IncompleteCheckpointError) or survives the next
successful commit to the same id; and the next save works. Overlapping saves
are in tests/test_soak.py; docs/reliability.md lists what was tried.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from faulty_storage import FlakyWriter, NoSpaceWriter, StopAtWriter
from faulty_storage import tests_on_worker_path as _let_workers_import_tests
from helpers import assert_same_tensor, random_tensor

import async_ckpt
from async_ckpt import (
    CheckpointNotFoundError,
    FileSystemWriter,
    IncompleteCheckpointError,
    SaveFailedError,
    WorkerDiedError,
)
from async_ckpt.storage.retry import RetryPolicy, call_with_retry, is_transient

pytestmark = pytest.mark.multiprocess
_let_workers_import_tests()

TESTS = Path(__file__).resolve().parent
# Four tensors of random bit patterns (NaN payloads included): four data files per save.
SHAPES = {"w0": (256, 512), "w1": (128, 256), "w2": (4096,), "w3": (33, 7)}


# ---------------------------------------------------------------------------- state helpers


def new_state() -> dict:
    """A training state: four float32 tensors and a step counter."""
    return {**{k: torch.zeros(s) for k, s in SHAPES.items()}, "step": -1}


def fill_(state: dict, step: int) -> dict:
    """The state of training step ``step``, written in place (what an optimizer does)."""
    for n, (key, shape) in enumerate(SHAPES.items()):
        state[key].copy_(random_tensor(torch.float32, shape, seed=1000 * step + n))
    state["step"] = step
    return state


def clone(state: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def assert_loads_exactly(path: Path, want: dict) -> None:
    """``path`` loads, and holds exactly ``want`` (bit for bit)."""
    got = {
        k: torch.full_like(v, 7.0) if isinstance(v, torch.Tensor) else None for k, v in want.items()
    }
    async_ckpt.load(got, checkpoint_id=path)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert_same_tensor(got[key], value)
        else:
            assert got[key] == value, key


def data_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.name.endswith(".data")} if path.exists() else set()


def assert_only_committed_files(path: Path) -> None:
    """The checkpoint directory holds its metadata and the files it lists, nothing else."""
    listed = set(json.loads((path / "metadata.json").read_bytes())["files"])
    assert {p.name for p in path.iterdir()} == listed | {"metadata.json"}


def wait_for(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)
    return path.read_text()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} is still alive"
        time.sleep(0.01)


def calls(log_dir: Path) -> list[str]:
    path = log_dir / "calls"
    return path.read_text().split() if path.exists() else []


@pytest.fixture
def gate(tmp_path):
    path = tmp_path / "gate"
    path.mkdir()
    yield path
    (path / "release").touch()  # nothing waits on a gate after its test


def committed(ckpt, state: dict, path: Path) -> dict:
    """Save ``state`` to ``path`` and wait for the commit; returns what it holds."""
    ckpt.save(state, storage_writer=FileSystemWriter(path, sync_files=False)).result(timeout=120)
    return clone(state)


# ---------------------------------------------------------------------------- worker killed


def kill_worker_at(ckpt, state: dict, path: Path, gate: Path, point: str) -> None:
    """Start a save to ``path``, SIGKILL the worker at ``point``; check the save's error."""
    fut = ckpt.save(state, storage_writer=StopAtWriter(path, gate=gate, point=point))
    pid = int(wait_for(gate / f"{point}.reached"))
    assert pid == ckpt.worker_pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerDiedError, match=r"exited with code -9 .*nothing was committed"):
        fut.result(timeout=60)


# "before-plan" (the job just received) leaves the same nothing on disk as "after-plan".
@pytest.mark.parametrize("point", ["after-plan", "mid-write", "before-metadata", "mid-commit"])
def test_worker_killed_while_overwriting_keeps_the_committed_checkpoint(
    ckpt, tmp_path, gate, point
):
    path, other = tmp_path / "ckpt", tmp_path / "other"
    state = fill_(new_state(), 1)
    first = committed(ckpt, state, path)
    elsewhere = committed(ckpt, fill_(state, 2), other)
    kill_worker_at(ckpt, fill_(state, 3), path, gate, point)

    # The id still names the checkpoint committed before: its metadata and files are intact.
    assert_loads_exactly(path, first)
    assert_loads_exactly(other, elsewhere)
    old_worker = ckpt.worker_pid
    third = committed(ckpt, fill_(state, 4), path)  # a fresh worker takes the next save
    assert ckpt.worker_pid != old_worker
    assert_loads_exactly(path, third)
    assert_only_committed_files(path)  # the killed save's partial files and temp metadata


@pytest.mark.parametrize("point", ["mid-write", "mid-commit"])
def test_worker_killed_during_a_new_checkpoint_leaves_nothing_loadable(ckpt, tmp_path, gate, point):
    earlier, path = tmp_path / "earlier", tmp_path / "new"
    state = fill_(new_state(), 1)
    before = committed(ckpt, state, earlier)
    kill_worker_at(ckpt, fill_(state, 2), path, gate, point)

    assert data_files(path), "the kill should have left partial data behind"
    with pytest.raises(IncompleteCheckpointError, match="never committed"):
        async_ckpt.load(clone(state), checkpoint_id=path)
    assert_loads_exactly(earlier, before)
    after = committed(ckpt, fill_(state, 5), path)
    assert_loads_exactly(path, after)
    assert_only_committed_files(path)


# ---------------------------------------------------------------------------- training killed

TRAIN_LOOP = """
import os, sys
sys.path[:0] = [{tests!r}]
import async_ckpt
from faulty_storage import StopAtWriter
from test_faults import fill_, new_state

root, gate, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
state = new_state()
ckpt = async_ckpt.AsyncCheckpointer().start()
with open(os.path.join(gate, "pids"), "w") as f:
    f.write(f"{{os.getpid()}} {{ckpt.worker_pid}}")
for step in range(10_000):
    fill_(state, step)  # a training step, in place
    cid = os.path.join(root, f"step-{{step:05d}}")
    if step == stop:
        writer = StopAtWriter(cid, gate=gate, point="mid-write", sync_files=True)
    else:
        writer = async_ckpt.FileSystemWriter(cid)
    ckpt.save(state, storage_writer=writer)  # no wait: the next step overlaps the write
"""


def resume_newest(root: Path, state: dict) -> int | None:
    """What a restarted job does: load the newest checkpoint that loads; returns its step."""
    for path in sorted(root.iterdir(), reverse=True):
        try:
            async_ckpt.load(state, checkpoint_id=path)
        except (IncompleteCheckpointError, CheckpointNotFoundError):
            continue
        return int(path.name.removeprefix("step-"))
    return None


@pytest.fixture
def training(tmp_path):
    """Starts the training loop above in its own process group; kills what is left at teardown."""
    started: list[subprocess.Popen] = []

    def run(stop: int) -> tuple[subprocess.Popen, Path, int, int]:
        root, gate = tmp_path / "run", tmp_path / "gate"
        root.mkdir()
        gate.mkdir()
        script = tmp_path / "train.py"
        script.write_text(TRAIN_LOOP.format(tests=str(TESTS)))
        proc = subprocess.Popen(
            [sys.executable, str(script), str(root), str(gate), str(stop)],
            start_new_session=True,  # its own process group: training and its worker
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(proc)
        wait_for(gate / "mid-write.reached", timeout=120)
        trainer, worker = map(int, (gate / "pids").read_text().split())
        assert trainer == proc.pid
        return proc, root, trainer, worker

    yield run
    for proc in started:
        (tmp_path / "gate" / "release").touch()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def test_job_killed_mid_write_resumes_from_the_newest_committed_step(ckpt, training):
    stop = 3
    proc, root, _, worker = training(stop)
    os.killpg(proc.pid, signal.SIGKILL)  # the node dies: training and worker at once
    proc.wait(timeout=30)
    wait_gone(worker)

    state = new_state()
    step = resume_newest(root, state)
    assert step == stop - 1  # one buffer: step 2 committed before step 3 could stage
    assert_loads_exactly(root / f"step-{step:05d}", fill_(new_state(), step))
    assert state["step"] == step
    for earlier in range(step):
        assert_loads_exactly(root / f"step-{earlier:05d}", fill_(new_state(), earlier))
    with pytest.raises(IncompleteCheckpointError):
        async_ckpt.load(new_state(), checkpoint_id=root / f"step-{stop:05d}")

    # Training goes on from there; re-saving the interrupted step clears its leftovers.
    again = committed(ckpt, fill_(state, stop), root / f"step-{stop:05d}")
    assert_loads_exactly(root / f"step-{stop:05d}", again)
    assert_only_committed_files(root / f"step-{stop:05d}")


def test_training_killed_mid_write_orphan_worker_finishes_and_exits(tmp_path, training):
    stop = 2
    proc, root, trainer, worker = training(stop)
    os.kill(trainer, signal.SIGKILL)  # only the training process dies
    proc.wait(timeout=30)
    assert alive(worker)  # its write is in flight, from the shared arena
    (tmp_path / "gate" / "release").touch()
    wait_gone(worker)  # it finishes that save, finds its caller gone, and exits

    state = new_state()
    step = resume_newest(root, state)
    # The snapshot of step 2 was complete in the arena: the worker committed it.
    assert step == stop
    for n in range(stop + 1):
        assert_loads_exactly(root / f"step-{n:05d}", fill_(new_state(), n))
        assert_only_committed_files(root / f"step-{n:05d}")


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
