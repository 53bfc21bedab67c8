"""The stager: snapshots in reused arenas, leases, skip-unchanged, tied tensors, fds."""

from __future__ import annotations

import gc
import threading

import numpy as np
import psutil
import pytest
import torch
from torch import nn

import async_ckpt
from async_ckpt import FileSystemWriter, Stager, StagerOptions
from async_ckpt.staging.snapshot import item_views
from async_ckpt.state.describe import describe
from async_ckpt.state.flatten import flatten

MiB = 1 << 20


def described(state_dict):
    return describe(flatten(state_dict))


def staged_bytes(snap) -> list[memoryview]:
    """The staged bytes of every item of a snapshot staged in one wave."""
    (wave,) = snap.waves
    return item_views(snap.arenas[wave.buffer], snap.state, wave.items, wave.offsets)


def staged_tensor(snap, index: int, like: torch.Tensor) -> torch.Tensor:
    """A copy of item ``index``'s staged bytes, as a tensor shaped like ``like``."""
    view = staged_bytes(snap)[index]
    return torch.frombuffer(view, dtype=torch.uint8).view(like.dtype).view(like.shape).clone()


def assert_staged(snap, tensors, expected) -> None:
    for i, (src, want) in enumerate(zip(tensors, expected, strict=True)):
        if src.numel():
            assert torch.equal(staged_tensor(snap, i, src), want), snap.state.items[i].key


def mixed_state() -> dict:
    """Small and large, contiguous and not, odd dtypes; > 16 MiB to use the copy threads."""
    return {
        "big": torch.randn(5 * MiB),  # 20 MiB: split over threads
        "mat": torch.randn(300, 200).t(),  # non-contiguous
        "half": torch.randn(77, dtype=torch.bfloat16),
        "flags": torch.rand(33) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(1000, dtype=torch.int64),
    }


def mutate(tensors) -> None:
    for t in tensors:
        if t.numel():
            t.copy_(torch.zeros_like(t) if t.dtype == torch.bool else t + 1)


@pytest.fixture
def stager_factory():
    made: list[Stager] = []

    def make(**options) -> Stager:
        stager = Stager(StagerOptions(**options))
        made.append(stager)
        return stager

    yield make
    for stager in made:
        for lease in stager._leases:
            lease.set()  # tests that hold a lease on purpose must not block close()
        stager.close()


@pytest.mark.parametrize("async_staging", [False, True], ids=["sync", "async"])
def test_staged_bytes_are_the_state_at_stage_time(stager_factory, async_staging):
    stager = stager_factory(async_staging=async_staging)
    state, tensors = described(mixed_state())
    expected = [t.clone() for t in tensors]
    snap = stager.stage(state, tensors)
    snap.staged.result(timeout=30)  # resolves in both modes
    mutate(tensors)  # allowed now: sync right after stage, async after staged
    assert_staged(snap, tensors, expected)
    assert snap.copied_bytes == sum(it.nbytes for it in state.items)


def test_buffers_are_reused_across_saves(stager_factory):
    stager = stager_factory()
    sd = {f"w{i}": torch.randn(4 * MiB // 4) for i in range(8)}  # 32 MiB
    proc = psutil.Process()
    rss = []
    for step in range(10):
        for t in sd.values():
            t.add_(1)  # in place: the loop itself allocates nothing big
        state, tensors = described(sd)
        snap = stager.stage(state, tensors)
        snap.release()  # what the executor does once the write is done
        assert stager.arenas_allocated == 1, f"stage {step + 1} allocated a new arena"
        assert stager.generation == 1
        gc.collect()
        rss.append(proc.memory_info().rss)
    assert rss[-1] - rss[1] < 8 * MiB, [r // MiB for r in rss]
    for i, t in enumerate(tensors):
        staged = torch.frombuffer(staged_bytes(snap)[i], dtype=torch.uint8).view(t.dtype)
        assert torch.equal(staged, t)

    sd["extra"] = torch.ones(10)  # a new structure re-plans once
    snap = stager.stage(*described(sd))
    assert stager.generation == 2
    assert stager.arenas_allocated == 2
    snap.release()
    stager.stage(*described(sd)).release()
    assert stager.generation == 2


def test_one_buffer_waits_for_the_lease(stager_factory):
    stager = stager_factory(num_buffers=1)
    sd = {"a": torch.arange(1000.0), "b": torch.ones(10, dtype=torch.int32)}
    state, tensors = described(sd)
    first_expected = [t.clone() for t in tensors]
    first = stager.stage(state, tensors)
    mutate(tensors)
    second_expected = [t.clone() for t in tensors]

    order: list[str] = []
    started, returned = threading.Event(), threading.Event()
    box = {}

    def second_stage() -> None:
        started.set()
        box["snap"] = stager.stage(state, tensors)
        order.append("second staged")
        returned.set()

    thread = threading.Thread(target=second_stage, daemon=True)
    thread.start()
    assert started.wait(120)
    # A little time for a wrong stage() to return; it cannot fail a right one.
    assert not returned.wait(0.3), "the second stage did not wait for the first lease"
    assert_staged(first, tensors, first_expected)  # not overwritten while leased
    order.append("released")
    first.release()
    thread.join(120)
    assert order == ["released", "second staged"]
    assert box["snap"].waves[0].buffer == first.waves[0].buffer
    assert_staged(box["snap"], tensors, second_expected)


def test_two_buffers_let_the_next_stage_proceed(stager_factory):
    stager = stager_factory(num_buffers=2)
    sd = {"a": torch.arange(1000.0), "b": torch.ones(10, dtype=torch.int32)}
    state, tensors = described(sd)
    first_expected = [t.clone() for t in tensors]
    first = stager.stage(state, tensors)  # lease held throughout
    mutate(tensors)
    second_expected = [t.clone() for t in tensors]

    box = {}
    thread = threading.Thread(target=lambda: box.update(snap=stager.stage(state, tensors)))
    thread.start()
    thread.join(120)  # returns as soon as the stage does; a blocked one never does
    assert not thread.is_alive(), "the second stage blocked although a buffer was free"
    second = box["snap"]
    assert second.waves[0].buffer != first.waves[0].buffer
    assert stager.arenas_allocated == 2
    assert_staged(first, tensors, first_expected)
    assert_staged(second, tensors, second_expected)


def test_skip_unchanged_copies_only_mutated_tensors(stager_factory):
    stager = stager_factory(skip_unchanged=True)
    sd = {"moved": torch.zeros(1000), "still": torch.arange(3000.0)}
    snap = stager.stage(*described(sd))
    assert snap.copied_bytes == 4000 + 12000
    snap.release()

    sd["moved"].add_(5)  # bumps _version
    state, tensors = described(sd)
    snap = stager.stage(state, tensors)
    assert snap.copied_bytes == 4000
    assert_staged(snap, tensors, [torch.full((1000,), 5.0), torch.arange(3000.0)])
    snap.release()

    snap = stager.stage(*described(sd))
    assert snap.copied_bytes == 0
    snap.release()


def test_skip_unchanged_never_trusts_a_new_tensor_at_a_reused_address(stager_factory):
    # Freed tensors' addresses come back at once, with _version 0 again: a state
    # rebuilt every save (torch.get_rng_state(), numpy leaves) must still be copied.
    stager = stager_factory(skip_unchanged=True)
    array = np.zeros(64, dtype=np.float32)
    for step in range(20):
        array[:] = step
        state, tensors = described({"fresh": torch.full((256,), float(step)), "np": array})
        snap = stager.stage(state, tensors)
        assert snap.copied_bytes == 256 * 4 + 64 * 4, f"step {step}"
        got = [staged_tensor(snap, i, t) for i, t in enumerate(tensors)]
        assert torch.equal(got[0], torch.full((256,), float(step)))
        assert torch.equal(got[1], torch.full((64,), float(step)))
        del state, tensors
        snap.release()


def test_without_skip_unchanged_everything_is_copied(stager_factory):
    stager = stager_factory()
    sd = {"a": torch.zeros(1000), "b": torch.zeros(500)}
    for _ in range(3):
        snap = stager.stage(*described(sd))
        assert snap.copied_bytes == 6000
        snap.release()


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(500, 32)
        self.body = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 500, bias=False)
        self.lm_head.weight = self.embed.weight


def test_tied_tensors_are_staged_once(stager_factory):
    stager = stager_factory()
    model = TiedLM()
    state, tensors = described({"model": model})
    keys = [it.key for it in state.items]
    assert "model.embed.weight" in keys and "model.lm_head.weight" in keys
    snap = stager.stage(state, tensors)
    unique = 500 * 32 * 4 + (32 * 32 + 32) * 4
    assert snap.copied_bytes == unique
    assert snap.arenas[0].nbytes < unique + 4096  # one slot for both keys
    snap.release()


@pytest.mark.multiprocess
def test_tied_tensors_load_after_an_async_save(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    with async_ckpt.AsyncCheckpointer() as ckpt:
        fut = ckpt.save({"model": model}, storage_writer=FileSystemWriter(tmp_path / "c"))
        assert fut.stats.copied_bytes == 500 * 32 * 4 + (32 * 32 + 32) * 4
        fut.result(timeout=120)
    fresh = TiedLM()
    async_ckpt.load({"model": fresh}, checkpoint_id=tmp_path / "c")
    assert fresh.lm_head.weight is fresh.embed.weight
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    plain = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    async_ckpt.load({"model": plain}, checkpoint_id=tmp_path / "c")
    assert torch.equal(plain["lm_head.weight"], model.embed.weight.detach())
    assert torch.equal(plain["embed.weight"], model.embed.weight.detach())


def test_thousands_of_tensors_use_few_fds(stager_factory):
    proc = psutil.Process()
    sd = {f"t{i}": torch.full((16,), float(i)) for i in range(2000)}
    before = proc.num_fds()
    stager = stager_factory()
    state, tensors = described(sd)
    snap = stager.stage(state, tensors)
    assert proc.num_fds() - before <= 4
    assert torch.equal(staged_tensor(snap, 1999, tensors[1999]), torch.full((16,), 1999.0))
    snap.release()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_stage_into_pinned_memory(stager_factory):
    stager = stager_factory(async_staging=True)
    device = torch.device("cuda")
    compute = torch.cuda.Stream(device)
    sd = {"w": torch.zeros(4096, 1024, device=device), "b": torch.randn(1024, device=device)}
    with torch.cuda.stream(compute):
        # Still running on the caller's (non-default) stream when stage is called:
        # the copy must wait for it.
        for _ in range(20):
            sd["w"].add_(torch.ones_like(sd["w"]) @ torch.eye(1024, device=device))
        state, tensors = described(sd)
        snap = stager.stage(state, tensors)
        snap.staged.result(timeout=60)
        expected = [t.cpu() for t in tensors]
        for t in tensors:
            t.mul_(-3)  # on the compute stream, right after staged resolved
    torch.cuda.synchronize()
    assert snap.arenas[0].pinned is True
    assert torch.equal(expected[0], torch.full((4096, 1024), 20.0))
    for i, want in enumerate(expected):
        assert torch.equal(staged_tensor(snap, i, want), want)
    snap.release()


def test_staging_memory_is_reported_and_a_failed_pin_warned_once(tmp_path, caplog):
    """SaveStats.staging_memory: None for a CPU state; for a CUDA state "pinned" or
    "pageable" (a failed cudaHostRegister, said once in the log)."""
    from types import SimpleNamespace

    from async_ckpt import AsyncCheckpointer

    with AsyncCheckpointer(executor="thread", no_dist=True) as ckpt:
        fut = ckpt.save({"w": torch.randn(8)}, checkpoint_id=tmp_path / "a")
        fut.result(timeout=60)
    assert fut.stats.staging_memory is None
    stager = Stager()
    stager._arenas = [SimpleNamespace(pinned=True), SimpleNamespace(pinned=True)]
    assert stager._staging_memory() == "pinned"
    stager._arenas = [SimpleNamespace(pinned=True), SimpleNamespace(pinned=False)]
    with caplog.at_level("WARNING", logger="async_ckpt"):
        assert stager._staging_memory() == "pageable"
        assert stager._staging_memory() == "pageable"
    assert sum("could not be page-locked" in r.message for r in caplog.records) == 1
    stager._arenas = []


@pytest.mark.parametrize("async_staging", [False, True], ids=["sync", "async"])
def test_a_fill_after_close_fails_through_staged_and_does_not_raise(stager_factory, async_staging):
    """A close() that gave up waiting for a snapshot's buffer (a hung write) frees the
    buffers: that snapshot's copy then fails, and says so through ``staged``."""
    stager = stager_factory(async_staging=async_staging)
    state, tensors = described({"w": torch.randn(1000)})
    snap = stager.begin(state, tensors)
    for lease in stager._leases:
        lease.set()  # as if close() had waited out its limit for this buffer
    stager.close()
    stager.fill(snap)  # does not raise: the copy's error lands in staged
    # resolves (a TimeoutError here would be a staging thread that died on the error)
    assert snap.staged.exception(timeout=30) is not None
