"""A staging memory budget: big states are staged and written in waves, bit-exact."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest
import torch
from faulty_storage import FailingWriter, SlowWriter, StopAtWriter, tests_on_worker_path
from helpers import read_meta

import async_ckpt
from async_ckpt import AsyncCheckpointer, CheckpointError, Stager, StagerOptions
from async_ckpt.staging.arena import align
from async_ckpt.staging.layout import buffer_capacity, plan_layout, split_to_fit
from async_ckpt.state.describe import describe
from async_ckpt.state.flatten import flatten
from async_ckpt.storage.local import FileSystemWriter

KiB = 1 << 10
BUDGET = 256 * KiB


def big_state(seed: int = 0) -> dict:
    """About 1.3 MiB: several waves under BUDGET, one tensor bigger than a buffer."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(600, 256, generator=gen),  # 600 KiB: cut into row blocks
        "layers": [torch.randn(64, 64, generator=gen) for _ in range(8)],  # 16 KiB each
        "bias": torch.randn(77, generator=gen).to(torch.bfloat16),
        "mask": torch.rand(1000, generator=gen) > 0.5,
        "step": 12,
        "note": "waves",
    }


def zeros_like_state(state: dict) -> dict:
    out = {k: torch.zeros_like(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
    out["layers"] = [torch.zeros_like(t) for t in state["layers"]]
    out.update(step=0, note="")
    return out


def assert_state_equal(loaded: dict, expected: dict) -> None:
    for key in ("embed", "bias", "mask"):
        assert torch.equal(loaded[key], expected[key]), key
    for got, want in zip(loaded["layers"], expected["layers"], strict=True):
        assert torch.equal(got, want)
    assert (loaded["step"], loaded["note"]) == (expected["step"], expected["note"])


# ------------------------------------------------------------------------ layout
def test_split_cuts_big_tensors_into_row_blocks_that_fit():
    state, tensors = describe(flatten(big_state()))
    capacity = buffer_capacity(BUDGET, 2)
    split, pieces = split_to_fit(state, tensors, capacity)
    embed = [it for it in split.items if it.key == "embed"]
    assert len(embed) == 5  # 600 rows, 128 rows of 1 KiB per 128 KiB buffer
    assert [it.offsets[0] for it in embed] == [0, 128, 256, 384, 512]
    assert sum(it.sizes[0] for it in embed) == 600
    assert all(align(it.nbytes) <= capacity for it in split.items)
    for item, piece in zip(split.items, pieces, strict=True):
        assert tuple(piece.shape) == item.sizes


def test_waves_fit_the_capacity_and_cover_every_item_once():
    state, tensors = describe(flatten(big_state()))
    capacity = buffer_capacity(BUDGET, 1)
    state, tensors = split_to_fit(state, tensors, capacity)
    layout = plan_layout(state.items, tensors, capacity)
    assert len(layout.waves) > 2
    assert layout.nbytes <= capacity
    covered = [i for items, _ in layout.waves for i in items]
    assert sorted(covered) == list(range(len(state.items)))
    for items, offsets in layout.waves:
        ends = [off + align(state.items[i].nbytes) for i, off in zip(items, offsets, strict=True)]
        assert max(ends) <= capacity


def test_a_row_bigger_than_the_buffer_is_refused_clearly():
    state, tensors = describe(flatten({"wide": torch.zeros(2, 64 * KiB)}))  # 256 KiB rows
    with pytest.raises(CheckpointError, match="one row along its first dimension"):
        split_to_fit(state, tensors, buffer_capacity(BUDGET, 2))


def test_budget_below_the_alignment_is_refused():
    with pytest.raises(CheckpointError, match="too small"):
        buffer_capacity(100, 2)


def test_budget_reads_sizes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ASYNC_CKPT_MAX_STAGING_BYTES", "3MiB")
    assert StagerOptions.from_env().max_staging_bytes == 3 << 20


# ------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "executor,num_buffers,async_staging",
    [("thread", 1, False), ("thread", 2, True), ("process", 1, True), ("process", 2, False)],
)
def test_saves_under_a_budget_load_bit_exact(tmp_path, executor, num_buffers, async_staging):
    tests_on_worker_path()
    stager = Stager(max_staging_bytes=BUDGET, num_buffers=num_buffers, async_staging=async_staging)
    state = big_state()
    with AsyncCheckpointer(executor=executor, stager=stager) as ckpt:
        for step in range(3):
            expected = {
                k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()
            }
            expected["layers"] = [t.clone() for t in state["layers"]]
            # slow writes: a buffer reused before its write finished would show up as corruption
            writer = SlowWriter(str(tmp_path / f"step{step}"), delay_s=0.02)
            future = ckpt.save(state, storage_writer=writer)
            future.staged.result(timeout=60)
            with torch.no_grad():  # training goes on as soon as the state is staged
                state["embed"].add_(1)
                for t in state["layers"]:
                    t.mul_(-1)
            future.result(timeout=120)
            assert sum(a.nbytes for a in stager.arenas) <= BUDGET
            loaded = zeros_like_state(expected)
            async_ckpt.load(loaded, checkpoint_id=tmp_path / f"step{step}")
            assert_state_equal(loaded, expected)
        assert stager.arenas_allocated == num_buffers  # steady saves reuse the buffers
    meta = read_meta(tmp_path / "step2")
    assert len(meta["entries"]["embed"]["chunks"]) > 1  # saved in row blocks
    assert meta["entries"]["embed"]["shape"] == [600, 256]


class EventGatedWriter(FileSystemWriter):
    """Holds the first data file until ``gate`` opens (thread executor: same process);
    ``reached`` is set once that write has begun."""

    def __init__(self, checkpoint_id: str, gate: threading.Event) -> None:
        super().__init__(checkpoint_id)
        self.gate = gate
        self.reached = threading.Event()
        self.files: list[str] = []

    def write_file(self, name, segments):
        self.files.append(name)
        if len(self.files) == 1:
            self.reached.set()
            assert self.gate.wait(120), "the test never opened the gate"
        return super().write_file(name, segments)


def test_save_waits_for_storage_when_the_state_exceeds_the_budget(tmp_path):
    """Back-pressure: with one buffer, staging wave 2 waits for wave 1's write."""
    gate = threading.Event()
    writer = EventGatedWriter(str(tmp_path / "ckpt"), gate)
    stager = Stager(max_staging_bytes=BUDGET, num_buffers=1)
    with AsyncCheckpointer(executor="thread", stager=stager) as ckpt:
        returned = threading.Event()
        box = {}

        def save() -> None:
            box["future"] = ckpt.save(big_state(), storage_writer=writer)
            returned.set()

        thread = threading.Thread(target=save)
        thread.start()
        assert writer.reached.wait(120), "the first wave was never written"
        # The first wave's write is held: save() must still be staging the next wave.
        # (Waiting a little gives a wrong save() the chance to return; it cannot make
        # a right one fail, however slow the machine.)
        assert not returned.wait(0.5), "save() returned while its first wave was unwritten"
        gate.set()
        assert returned.wait(120)
        thread.join()
        box["future"].result(timeout=120)
    assert len(writer.files) > 2  # each wave wrote its own data files
    loaded = zeros_like_state(big_state())
    async_ckpt.load(loaded, checkpoint_id=tmp_path / "ckpt")
    assert_state_equal(loaded, big_state())


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_a_failed_wave_commits_nothing_and_frees_the_buffers(tmp_path, executor):
    tests_on_worker_path()
    stager = Stager(max_staging_bytes=BUDGET, num_buffers=1)
    with AsyncCheckpointer(executor=executor, stager=stager) as ckpt:
        bad = FailingWriter(str(tmp_path / "bad"), message="disk on fire")
        with pytest.raises(Exception, match="disk on fire"):
            ckpt.save(big_state(), storage_writer=bad).result(timeout=60)
        assert not (tmp_path / "bad" / "metadata.json").exists()
        # Every buffer came back: the next save neither hangs nor mixes in old bytes.
        ckpt.save(big_state(1), checkpoint_id=tmp_path / "good").result(timeout=60)
    loaded = zeros_like_state(big_state(1))
    async_ckpt.load(loaded, checkpoint_id=tmp_path / "good")
    assert_state_equal(loaded, big_state(1))


def test_state_within_the_budget_stays_one_wave(tmp_path):
    stager = Stager(max_staging_bytes=64 << 20)
    state, tensors = describe(flatten(big_state()))
    snap = stager.stage(state, tensors)
    try:
        assert len(snap.waves) == 1
        assert len(snap.state.items) == len(state.items)  # nothing was cut
    finally:
        snap.release()
        stager.close()


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_async_staging_in_parts_loads_bit_exact(tmp_path, executor):
    """wave_bytes: the writer starts on the first part while the rest is copied."""
    tests_on_worker_path()
    stager = Stager(async_staging=True, wave_bytes=64 * KiB, num_buffers=2)
    state = big_state()
    tied = {"a": state["embed"], "b": state["embed"].view(600, 256)}  # one slot, two keys
    with AsyncCheckpointer(executor=executor, stager=stager) as ckpt:
        for step in range(2):
            expected = big_state() if step == 0 else None
            future = ckpt.save({**state, "tied": tied}, checkpoint_id=tmp_path / f"s{step}")
            future.staged.result(timeout=60)
            assert len(stager._layout.waves) > 3
            future.result(timeout=60)
            if expected is not None:
                loaded = zeros_like_state(expected)
                loaded["tied"] = {"a": torch.zeros(600, 256), "b": torch.zeros(600, 256)}
                async_ckpt.load(loaded, checkpoint_id=tmp_path / "s0")
                assert_state_equal(loaded, expected)
                assert torch.equal(loaded["tied"]["b"], expected["embed"])
        assert stager.arenas_allocated == 2
    assert len(read_meta(tmp_path / "s1")["files"]) > 3  # each part went to its own files


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_cancelling_a_save_mid_waves_frees_the_buffers(tmp_path, gate, executor):
    tests_on_worker_path()
    stager = Stager(max_staging_bytes=BUDGET, num_buffers=2, async_staging=True)
    with AsyncCheckpointer(executor=executor, stager=stager) as ckpt:
        # The first wave's write waits for the gate: the cancel comes mid-waves however
        # slow this thread is.
        held = StopAtWriter(str(tmp_path / "slow"), gate=gate, point="before-write")
        future = ckpt.save(big_state(), storage_writer=held)
        assert future.cancel()
        with pytest.raises(CancelledError):
            future.result(timeout=120)
        assert not (tmp_path / "slow" / "metadata.json").exists()
        (gate / "release").touch()  # a thread executor's write goes on; it must not commit
        ckpt.save(big_state(2), checkpoint_id=tmp_path / "next").result(timeout=120)
    assert not (tmp_path / "slow" / "metadata.json").exists()
    loaded = zeros_like_state(big_state(2))
    async_ckpt.load(loaded, checkpoint_id=tmp_path / "next")
    assert_state_equal(loaded, big_state(2))


# --------------------------------------------------------------------- two ranks
GLOBAL = torch.arange(512 * 64, dtype=torch.float32).reshape(512, 64)  # 128 KiB


def _budget_rank(rank, world_size, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    state = {
        "sharded": distribute_tensor(GLOBAL.clone(), mesh, [Shard(0)]),  # 64 KiB per rank
        "replicated": GLOBAL * 3,  # the same on both ranks: written once
        "step": 5,
    }
    stager = Stager(max_staging_bytes=32 * KiB, num_buffers=2)
    with AsyncCheckpointer(stager=stager) as ckpt:
        meta = ckpt.save(state, checkpoint_id=f"{root}/ckpt").result(timeout=120)
    return {"waves": len(stager._layout.waves), "files": meta.files}


@pytest.mark.multiprocess
def test_two_ranks_under_a_budget_dedup_and_load_anywhere(tmp_path):
    from dist_utils import run_ranks

    results = run_ranks(_budget_rank, 2, str(tmp_path))
    assert all(r["waves"] > 4 for r in results)
    # replicated row blocks are cut alike on both ranks, so they are stored once
    assert sum(results[0]["files"].values()) == 2 * GLOBAL.nbytes
    out = {"sharded": torch.zeros(512, 64), "replicated": torch.zeros(512, 64), "step": 0}
    async_ckpt.load(out, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    assert torch.equal(out["sharded"], GLOBAL)
    assert torch.equal(out["replicated"], GLOBAL * 3)
    assert out["step"] == 5


def test_a_timeout_while_waves_stage_fails_the_future_not_save(tmp_path):
    """Synchronous staging: save() returns its future; the future says why the save ended."""
    stager = Stager(max_staging_bytes=BUDGET, num_buffers=1)
    with AsyncCheckpointer(executor="thread", stager=stager) as ckpt:
        slow = SlowWriter(str(tmp_path / "slow"), delay_s=0.4)
        future = ckpt.save(big_state(), storage_writer=slow, timeout=0.2)
        with pytest.raises(async_ckpt.SaveTimeoutError):
            future.result(timeout=60)
        ckpt.save(big_state(3), checkpoint_id=tmp_path / "next").result(timeout=60)
    assert not (tmp_path / "slow" / "metadata.json").exists()


def test_stage_alone_refuses_more_waves_than_buffers():
    stager = Stager(max_staging_bytes=BUDGET, num_buffers=2)
    try:
        with pytest.raises(CheckpointError, match="waves"):
            stager.stage(*describe(flatten(big_state())))
        assert stager.buffer_free()  # the refused snapshot gave its buffer back
    finally:
        stager.close()


def test_close_while_a_cancelled_save_still_stages_frees_the_buffer(tmp_path):
    """The copy outlives close(): its hand-off must fail the save, not vanish."""
    stager = Stager(async_staging=True)
    state = {"w": torch.ones(64 << 20)}  # 256 MiB: the copy takes tens of milliseconds
    ckpt = AsyncCheckpointer(stager=stager).start(state)
    future = ckpt.save(state, checkpoint_id=tmp_path / "a")
    future.cancel()
    ckpt.close()
    with AsyncCheckpointer(stager=stager) as again:  # the shared stager's buffer came back
        again.save(state, checkpoint_id=tmp_path / "b").result(timeout=60)
    stager.close()
    assert not (tmp_path / "a" / "metadata.json").exists()


UNEVEN = torch.arange(129 * 64, dtype=torch.float32).reshape(129, 64)  # 65 + 64 rows


def _uneven_rank(rank, world_size, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    state = {"vocab": distribute_tensor(UNEVEN.clone(), mesh, [Shard(0)])}
    # 16 KiB buffers hold 64 rows: rank 0 cuts its 65 rows in two, rank 1 keeps one piece
    with AsyncCheckpointer(stager=Stager(max_staging_bytes=32 * KiB, num_buffers=2)) as ckpt:
        ckpt.save(state, checkpoint_id=f"{root}/ckpt").result(timeout=120)
    return True


@pytest.mark.multiprocess
def test_uneven_shards_cut_differently_per_rank_still_agree(tmp_path):
    from dist_utils import run_ranks

    run_ranks(_uneven_rank, 2, str(tmp_path))
    out = {"vocab": torch.zeros(129, 64)}
    async_ckpt.load(out, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    assert torch.equal(out["vocab"], UNEVEN)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_a_failed_write_stops_the_copy_of_later_waves(tmp_path, executor):
    tests_on_worker_path()
    stager = Stager(max_staging_bytes=BUDGET, num_buffers=1)
    with AsyncCheckpointer(executor=executor, stager=stager) as ckpt:
        future = ckpt.save(big_state(), storage_writer=FailingWriter(str(tmp_path / "bad")))
        with pytest.raises(Exception, match="disk on fire"):
            future.result(timeout=60)
        total = sum(it.nbytes for it in describe(flatten(big_state()))[0].items)
        # wave 1 waited for wave 0's write, which failed: nothing after wave 0 was copied
        assert future.stats.copied_bytes <= BUDGET < total
        ckpt.save(big_state(1), checkpoint_id=tmp_path / "good").result(timeout=60)
    loaded = zeros_like_state(big_state(1))
    async_ckpt.load(loaded, checkpoint_id=tmp_path / "good")
    assert_state_equal(loaded, big_state(1))
