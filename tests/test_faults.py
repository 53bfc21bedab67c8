"""Faults during saves: the worker or the whole training job killed mid-save.

Every fault test checks the same four things: the failing save reports a clear
error; every checkpoint committed before it still loads bit-exact; nothing the
failed save half-wrote loads (IncompleteCheckpointError) or survives the next
successful commit to the same id; and the next save works. Storage faults (full
disk, flaky storage, retries) are in tests/test_faults_storage.py, overlapping
saves in tests/test_soak.py; docs/reliability.md lists what was tried.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from faulty_storage import (
    StopAtWriter,
    age_leftovers,
    assert_loads_exactly,
    assert_only_committed_files,
    clone,
    committed,
    data_files,
    fill_,
    new_state,
    wait_reached,
)
from faulty_storage import tests_on_worker_path as _let_workers_import_tests
from helpers import wait_until

import async_ckpt
from async_ckpt import CheckpointNotFoundError, IncompleteCheckpointError, WorkerDiedError

pytestmark = pytest.mark.multiprocess
_let_workers_import_tests()


# ---------------------------------------------------------------------------- worker killed


def kill_worker_at(ckpt, state: dict, path: Path, gate: Path, point: str) -> None:
    """Start a save to ``path``, SIGKILL the worker at ``point``; check the save's error."""
    fut = ckpt.save(state, storage_writer=StopAtWriter(path, gate=gate, point=point))
    pid = wait_reached(gate, point)
    assert pid == ckpt.worker_pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerDiedError, match=r"exited with code -9 .*nothing was committed"):
        fut.result(timeout=120)


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
    # The killed save's partial files and temp metadata stay while they are young (they
    # could be a live writer's), and go with the first commit after the orphan grace.
    age_leftovers(path)
    assert_loads_exactly(path, committed(ckpt, fill_(state, 6), path))
    assert_only_committed_files(path)


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
    age_leftovers(path)  # past the orphan grace: the next commit sweeps the partial files
    after = committed(ckpt, fill_(state, 5), path)
    assert_loads_exactly(path, after)
    assert_only_committed_files(path)


# ---------------------------------------------------------------------------- training killed

TESTS = Path(__file__).resolve().parent
TRAIN_LOOP = """
import os, sys
sys.path[:0] = [{tests!r}]
import async_ckpt
from faulty_storage import StopAtWriter, fill_, new_state

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


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
def training(tmp_path, gate):
    """Starts the training loop above in its own process group; kills what is left at teardown."""
    started: list[subprocess.Popen] = []

    def run(stop: int) -> tuple[subprocess.Popen, Path, int, int]:
        root = tmp_path / "run"
        root.mkdir()
        script = tmp_path / "train.py"
        script.write_text(TRAIN_LOOP.format(tests=str(TESTS)))
        proc = subprocess.Popen(
            [sys.executable, str(script), str(root), str(gate), str(stop)],
            start_new_session=True,  # its own process group: training and its worker
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(proc)
        wait_reached(gate, "mid-write", timeout=120)
        trainer, worker = map(int, (gate / "pids").read_text().split())
        assert trainer == proc.pid
        return proc, root, trainer, worker

    yield run
    for proc in started:
        (gate / "release").touch()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=120)


def test_job_killed_mid_write_resumes_from_the_newest_committed_step(ckpt, training):
    stop = 3
    proc, root, _, worker = training(stop)
    os.killpg(proc.pid, signal.SIGKILL)  # the node dies: training and worker at once
    proc.wait(timeout=120)
    wait_until(lambda: not alive(worker), 120, f"worker {worker} did not exit")

    state = new_state()
    step = resume_newest(root, state)
    assert step == stop - 1  # one buffer: step 2 committed before step 3 could stage
    assert_loads_exactly(root / f"step-{step:05d}", fill_(new_state(), step))
    assert state["step"] == step
    for earlier in range(step):
        assert_loads_exactly(root / f"step-{earlier:05d}", fill_(new_state(), earlier))
    with pytest.raises(IncompleteCheckpointError):
        async_ckpt.load(new_state(), checkpoint_id=root / f"step-{stop:05d}")

    # Training goes on from there; re-saving the interrupted step clears its leftovers
    # (once past the orphan grace: young ones could be a live writer's).
    age_leftovers(root / f"step-{stop:05d}")
    again = committed(ckpt, fill_(state, stop), root / f"step-{stop:05d}")
    assert_loads_exactly(root / f"step-{stop:05d}", again)
    assert_only_committed_files(root / f"step-{stop:05d}")


def test_training_killed_mid_write_orphan_worker_finishes_and_exits(gate, training):
    stop = 2
    proc, root, trainer, worker = training(stop)
    os.kill(trainer, signal.SIGKILL)  # only the training process dies
    proc.wait(timeout=120)
    assert alive(worker)  # its write is in flight, from the shared arena
    (gate / "release").touch()
    wait_until(
        lambda: not alive(worker), 120, f"worker {worker} did not exit"
    )  # it finishes that save, finds its caller gone, and exits

    state = new_state()
    step = resume_newest(root, state)
    # The snapshot of step 2 was complete in the arena: the worker committed it.
    assert step == stop
    for n in range(stop + 1):
        assert_loads_exactly(root / f"step-{n:05d}", fill_(new_state(), n))
        assert_only_committed_files(root / f"step-{n:05d}")
