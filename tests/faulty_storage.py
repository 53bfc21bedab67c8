"""Storage writers that fail on purpose (importable by worker processes), and the
training state and checks that the fault tests share.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import torch
from helpers import assert_same_tensor, random_tensor

import async_ckpt
from async_ckpt.storage.local import FileSystemWriter


class FailingWriter(FileSystemWriter):
    """Raises from write_file on the ranks listed (all when empty)."""

    def __init__(
        self, checkpoint_id: str, *, fail_ranks: tuple[int, ...] = (), message: str = "disk on fire"
    ) -> None:
        super().__init__(checkpoint_id)
        self.fail_ranks = fail_ranks
        self.message = message

    def write_file(self, name, segments):
        rank = int(name.split("-r")[1].split("-")[0])
        if not self.fail_ranks or rank in self.fail_ranks:
            raise OSError(f"{self.message} (rank {rank})")
        return super().write_file(name, segments)


class SlowWriter(FileSystemWriter):
    """Sleeps before each data file: a save that takes at least that long (to outlast a
    save timeout, or to widen a window a test hopes to catch a bug in).

    Never to hold a save while the test acts on it: on a loaded machine the test may
    only get to run once the sleep is over. Hold it with :class:`StopAtWriter`.
    """

    def __init__(self, checkpoint_id: str, *, delay_s: float = 1.0) -> None:
        super().__init__(checkpoint_id)
        self.delay_s = delay_s

    def write_file(self, name, segments):
        time.sleep(self.delay_s)
        return super().write_file(name, segments)


def tests_on_worker_path() -> None:
    """Let worker processes import this module (they inherit PYTHONPATH)."""
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)


# ---------------------------------------------------------------------------- reliability tests
# Writers for tests/test_faults.py, tests/test_faults_storage.py and tests/test_async_save.py.
# Each records what it did in files under a directory the test owns, because it runs in
# the worker process.

GATE_WAIT_S = 120.0  # a gate nobody opens fails the save instead of hanging the suite


class GateNeverOpened(RuntimeError):
    """A gated writer waited ``GATE_WAIT_S`` for its release file (not a transient error)."""


def _wait_at(gate: str, point: str) -> None:
    """Announce ``<gate>/<point>.reached`` (holding this pid), then wait for ``<gate>/release``."""
    reached = os.path.join(gate, f"{point}.reached")
    with open(reached + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(reached + ".tmp", reached)
    deadline = time.monotonic() + GATE_WAIT_S
    while not os.path.exists(os.path.join(gate, "release")):
        if time.monotonic() > deadline:
            raise GateNeverOpened(f"gate {gate} was never released at {point}")
        time.sleep(0.005)


def wait_reached(gate: Path, point: str, timeout: float = 120.0) -> int:
    """Wait until a gated writer announces ``point``; returns the pid of the process there.

    ``timeout`` only bounds a wait for a save that never gets there (a broken test): a
    loaded machine may need long to start a worker and get the save to that point.
    """
    reached = gate / f"{point}.reached"
    deadline = time.monotonic() + timeout
    while not reached.exists():
        assert time.monotonic() < deadline, f"{reached} never appeared"
        time.sleep(0.005)
    return int(reached.read_text())


class StopAtWriter(FileSystemWriter):
    """Stops a save at one point and waits there, so a test can kill the process or act
    while the save is held. The test opens the gate by creating ``<gate>/release``.

    Points, in the order a save reaches them:

    * ``"before-plan"``: the worker has just received the save (the writer is
      unpickled there), before planning;
    * ``"after-plan"``: planning and key validation are done, nothing written
      (``prepare`` is the first writer call after the plan);
    * ``"before-write"``: the first data-file write has started, nothing written
      (a save held in flight, for tests that act meanwhile);
    * ``"mid-write"``: the first data file is half written and flushed;
    * ``"before-metadata"``: every data file is written, the metadata is not;
    * ``"mid-commit"``: the metadata's temporary file is written, not renamed.
    """

    POINTS = (
        "before-plan",
        "after-plan",
        "before-write",
        "mid-write",
        "before-metadata",
        "mid-commit",
    )

    def __init__(self, checkpoint_id, *, gate, point: str, sync_files: bool = False) -> None:
        if point not in self.POINTS:
            raise ValueError(f"unknown stop point {point!r}")
        super().__init__(checkpoint_id, sync_files=sync_files)
        self.gate = os.fspath(gate)
        self.point = point
        self._armed = True

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.point == "before-plan":
            _wait_at(self.gate, self.point)

    def _stop(self, point: str) -> bool:
        if self._armed and self.point == point:
            self._armed = False
            return True
        return False

    def prepare(self, *, coordinator: bool) -> None:
        if self._stop("after-plan"):
            _wait_at(self.gate, self.point)
        super().prepare(coordinator=coordinator)

    def write_file(self, name, segments):
        if self._stop("before-write"):
            _wait_at(self.gate, self.point)
        elif self._stop("mid-write"):
            data = b"".join(bytes(s.cast("B") if s.format != "B" else s) for s in segments)
            with open(self.path / name, "wb") as f:
                f.write(data[: max(1, len(data) // 2)])
                f.flush()
                os.fsync(f.fileno())
            _wait_at(self.gate, self.point)
        return super().write_file(name, segments)

    def commit(self, metadata: bytes) -> bytes | None:
        if self._stop("before-metadata"):
            _wait_at(self.gate, self.point)
        elif self._stop("mid-commit"):
            tmp = self.path / f".metadata.json.tmp-{os.getpid()}-stopped"
            tmp.write_bytes(metadata)
            _wait_at(self.gate, self.point)
        return super().commit(metadata)


def _log_call(log_dir: str, name: str) -> None:
    """Append one line for this call to ``<log_dir>/calls`` (one small O_APPEND write)."""
    with open(os.path.join(log_dir, "calls"), "a") as f:
        f.write(name + "\n")


def _claim_failure(log_dir: str, failures: int) -> bool:
    """Whether this call is one of the first ``failures`` (-1: every call) to fail.

    Each failing call claims a marker file with O_EXCL, so concurrent writer threads
    (and processes) never both take, or both miss, the same slot.
    """
    if failures < 0:
        return True
    for slot in range(failures):
        try:
            os.close(os.open(os.path.join(log_dir, f"fail-{slot}"), os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            continue
    return False


class NoSpaceWriter(FileSystemWriter):
    """Writes ``fail_after`` bytes of a data file, then fails with ENOSPC (disk full).

    ``files`` limits the failure to the first N data-file calls (0: every call);
    later calls write normally. Calls are logged to ``<log_dir>/calls``.
    """

    def __init__(self, checkpoint_id, *, log_dir, fail_after: int = 4096, files: int = 0) -> None:
        super().__init__(checkpoint_id, sync_files=False)
        self.log_dir = os.fspath(log_dir)
        self.fail_after = fail_after
        self.files = files

    def write_file(self, name, segments):
        _log_call(self.log_dir, name)
        if not _claim_failure(self.log_dir, self.files or -1):
            return super().write_file(name, segments)
        data = b"".join(bytes(s.cast("B") if s.format != "B" else s) for s in segments)
        with open(self.path / name, "wb") as f:
            f.write(data[: self.fail_after])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / name))


class FlakyWriter(FileSystemWriter):
    """The first ``failures`` data-file calls write part of the file, then fail with ``error``.

    ``failures=-1`` fails every call. ``error`` is ``"connection"`` (ConnectionResetError),
    ``"timeout"`` (TimeoutError), or an errno name (``"EIO"``, ``"EACCES"``) for a plain
    OSError. Calls are logged to ``<log_dir>/calls``.
    """

    def __init__(
        self, checkpoint_id, *, log_dir, failures: int = 2, error: str = "connection"
    ) -> None:
        super().__init__(checkpoint_id, sync_files=False)
        self.log_dir = os.fspath(log_dir)
        self.failures = failures
        self.error = error

    def _exception(self, name: str) -> OSError:
        if self.error == "connection":
            return ConnectionResetError(errno.ECONNRESET, "connection reset by storage", name)
        if self.error == "timeout":
            return TimeoutError(f"storage did not answer while writing {name}")
        code = getattr(errno, self.error)
        return OSError(code, os.strerror(code), name)

    def write_file(self, name, segments):
        _log_call(self.log_dir, name)
        if _claim_failure(self.log_dir, self.failures):
            with open(self.path / name, "wb") as f:
                f.write(b"partial")
            raise self._exception(name)
        return super().write_file(name, segments)


# ---------------------------------------------------------------------------- fault-test state
# A training state of four tensors, and the checks every fault test makes on it.

# Four tensors of random bit patterns (NaN payloads included): four data files per save.
SHAPES = {"w0": (256, 512), "w1": (128, 256), "w2": (4096,), "w3": (33, 7)}


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


def committed(ckpt, state: dict, path: Path) -> dict:
    """Save ``state`` to ``path`` and wait for the commit; returns what it holds."""
    ckpt.save(state, storage_writer=FileSystemWriter(path, sync_files=False)).result(timeout=120)
    return clone(state)


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
            assert got[key] == value, f"{key}: loaded {got[key]!r}, saved {value!r}"


def data_files(path: Path) -> set[str]:
    """Names of the ``*.data`` files in ``path`` (none when it does not exist)."""
    return {p.name for p in path.iterdir() if p.name.endswith(".data")} if path.exists() else set()


def age_leftovers(path: Path) -> None:
    """Make every file in ``path`` look untouched since 1970, as a killed save's leftovers
    look once the orphan grace has passed (the next commit then sweeps them)."""
    for entry in Path(path).iterdir():
        os.utime(entry, (0, 0))


def assert_only_committed_files(path: Path) -> None:
    """The checkpoint directory holds its metadata and the files it lists, nothing else."""
    listed = set(json.loads((path / "metadata.json").read_bytes())["files"])
    held = {p.name for p in path.iterdir()}
    assert held == listed | {"metadata.json"}, (
        f"{path} holds {sorted(held)}, lists {sorted(listed)}"
    )
