"""Soak and stress: many async saves in a row, every one verified; saves that overlap.

``test_soak_long`` (200 saves of ~256 MiB, marked ``soak``) is left out of
``make test``; run it with ``pytest -m soak tests/test_soak.py -s``. The short
soak (10 saves of ~16 MiB) runs in ``make test``. Both check that every
checkpoint holds exactly the state at its save call, and that memory, open
file descriptors, threads (of the training process and of the worker) and
/dev/shm entries stay flat from an early save to the last.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch
from faulty_storage import SlowWriter
from faulty_storage import tests_on_worker_path as _let_workers_import_tests
from helpers import assert_same_tensor, random_tensor

import async_ckpt
from async_ckpt import AsyncCheckpointer, FileSystemWriter, Stager, StagerOptions

pytestmark = pytest.mark.multiprocess
_let_workers_import_tests()

MiB = 1 << 20


def shm_entries() -> int:
    return len(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else 0


@dataclass
class Sample:
    """Resource use of both processes at one point of the soak."""

    save: int
    main_rss: int
    main_fds: int
    main_threads: int
    worker_rss: int
    worker_fds: int
    worker_threads: int
    shm: int

    @classmethod
    def take(cls, save: int, worker: psutil.Process) -> Sample:
        main = psutil.Process()
        return cls(
            save,
            main.memory_info().rss,
            main.num_fds(),
            main.num_threads(),
            worker.memory_info().rss,
            worker.num_fds(),
            worker.num_threads(),
            shm_entries(),
        )

    def line(self) -> str:
        return (
            f"save {self.save:4d}: main rss {self.main_rss / MiB:7.1f} MiB fds {self.main_fds:3d} "
            f"threads {self.main_threads:2d} | worker rss {self.worker_rss / MiB:7.1f} MiB "
            f"fds {self.worker_fds:3d} threads {self.worker_threads:2d} | /dev/shm {self.shm}"
        )


@dataclass
class SoakReport:
    samples: list[Sample] = field(default_factory=list)
    stall_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    verify_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> str:
        def med_max(xs: list[float]) -> str:
            return f"median {statistics.median(xs) * 1e3:.1f} ms, max {max(xs) * 1e3:.1f} ms"

        return "\n".join(
            [s.line() for s in self.samples]
            + [
                f"stall (save call): {med_max(self.stall_s)}",
                f"save to commit: {med_max(self.total_s)}",
                f"verify (load + compare): {med_max(self.verify_s)}",
                f"wall: {self.wall_s:.1f} s for {len(self.total_s)} saves",
            ]
        )


def soak(root: Path, *, saves: int, mib: int, keep: int = 3, warmup: int = 3) -> SoakReport:
    """``saves`` async saves of a ``mib`` MiB state, each verified right after its commit."""
    n = 8
    numel = mib * MiB // 4 // n
    state = {f"layer{i}": random_tensor(torch.float32, (numel,), seed=i) for i in range(n)}
    state["step"] = 0
    expected = {k: torch.empty_like(v) for k, v in state.items() if torch.is_tensor(v)}
    loaded = {k: torch.empty_like(v) for k, v in expected.items()}
    report = SoakReport()
    started = time.perf_counter()
    with AsyncCheckpointer(executor="process") as ckpt:
        ckpt.start()
        worker = psutil.Process(ckpt.worker_pid)
        for step in range(saves):
            for t in expected:  # a training step: every tensor changes in place
                state[t].add_(1.0)
            state["step"] = step
            for k, t in expected.items():
                t.copy_(state[k])
            path = root / f"step-{step:05d}"
            fut = ckpt.save(state, storage_writer=FileSystemWriter(path))
            for k in expected:  # training goes on while the save writes
                state[k].mul_(-1.0)
            fut.result(timeout=600)

            t0 = time.perf_counter()
            loaded["step"] = None
            async_ckpt.load(loaded, checkpoint_id=path)
            for k, want in expected.items():  # bit-exact: compare the raw bits
                if not torch.equal(loaded[k].view(torch.int32), want.view(torch.int32)):
                    assert_same_tensor(loaded[k], want)
            assert loaded["step"] == step
            report.verify_s.append(time.perf_counter() - t0)
            report.stall_s.append(fut.stats.stall_s)
            report.total_s.append(fut.stats.total_s)
            if step >= keep:
                shutil.rmtree(root / f"step-{step - keep:05d}")
            if step == warmup or step == saves - 1 or (step + 1) % 50 == 0:
                report.samples.append(Sample.take(step, worker))
        assert ckpt.worker_pid == worker.pid, "the worker was restarted during the soak"
    report.wall_s = time.perf_counter() - started
    return report


def assert_flat(report: SoakReport, *, rss_slack: int) -> None:
    first, last = report.samples[0], report.samples[-1]
    assert last.main_rss - first.main_rss < rss_slack, report.summary()
    assert last.worker_rss - first.worker_rss < rss_slack, report.summary()
    assert last.main_fds <= first.main_fds and last.worker_fds <= first.worker_fds, report.summary()
    assert last.main_threads <= first.main_threads, report.summary()
    assert last.worker_threads <= first.worker_threads, report.summary()
    assert last.shm <= first.shm, report.summary()


def test_soak_short(tmp_path):
    report = soak(tmp_path, saves=10, mib=16, warmup=2)
    print("\n" + report.summary())
    assert_flat(report, rss_slack=32 * MiB)
    assert len(list(tmp_path.iterdir())) == 3  # only the last few stay on disk


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_long(tmp_path):
    report = soak(tmp_path, saves=200, mib=256, warmup=5)
    print("\n" + report.summary())
    assert_flat(report, rss_slack=64 * MiB)


# ---------------------------------------------------------------------------- overlapping saves


def _training_state() -> dict:
    return {f"w{i}": torch.zeros(shape) for i, shape in enumerate([(256, 512), (4096,), (33, 7)])}


@pytest.mark.parametrize("num_buffers", [1, 2])
def test_each_of_ten_overlapping_saves_holds_the_state_at_its_call(tmp_path, num_buffers):
    """Each save starts before the previous one committed; training mutates in between."""
    stager = Stager(StagerOptions(num_buffers=num_buffers))
    state = _training_state()
    expected, futures, overlapped = [], [], 0
    try:
        with AsyncCheckpointer(executor="process", stager=stager) as ck:
            for step in range(10):
                for n, t in enumerate(state.values()):  # a training step
                    t.copy_(random_tensor(torch.float32, tuple(t.shape), seed=100 * step + n))
                expected.append({k: t.clone() for k, t in state.items()})
                overlapped += bool(futures) and not futures[-1].done()
                writer = SlowWriter(tmp_path / f"s{step}", delay_s=0.05)
                futures.append(ck.save(state, storage_writer=writer))
                for t in state.values():  # and writes again as soon as save returns
                    t.mul_(-2.0)
            for fut in futures:
                fut.result(timeout=120)
    finally:
        stager.close()
    assert overlapped >= 5, "the saves did not overlap; the test proves nothing"
    for step, want in enumerate(expected):
        got = {k: torch.full_like(t, 7.0) for k, t in want.items()}
        async_ckpt.load(got, checkpoint_id=tmp_path / f"s{step}")
        for key, t in want.items():
            assert_same_tensor(got[key], t)
