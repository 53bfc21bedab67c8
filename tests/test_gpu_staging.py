"""CUDA staging is ordered with the caller's stream (needs a GPU; skipped without one)."""

from __future__ import annotations

import pytest
import torch

import async_ckpt
from async_ckpt import AsyncCheckpointer, Stager

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_an_update_queued_right_after_save_never_reaches_the_checkpoint(tmp_path, executor):
    """With async staging the caller does not await ``staged``: its next in-place update,
    queued on its stream at once, must still run after the device-to-host copy."""
    device = torch.device("cuda")
    compute = torch.cuda.Stream(device)
    weights = {f"w{i}": torch.zeros(1024, 1024, device=device) for i in range(64)}  # 256 MiB
    stager = Stager(async_staging=True)
    with AsyncCheckpointer(executor=executor, no_dist=True, stager=stager) as ckpt:
        with torch.cuda.stream(compute):
            for step in range(3):
                for w in weights.values():
                    w.fill_(float(step))
                fut = ckpt.save(dict(weights), checkpoint_id=tmp_path / f"s{step}")
                for w in weights.values():  # an "optimizer step", staged not awaited
                    w.add_(1000.0)
                fut.result(timeout=120)
                assert fut.stats.staging_memory == "pinned"
    for step in range(3):
        target = {k: torch.empty(1024, 1024) for k in weights}
        async_ckpt.load(target, checkpoint_id=tmp_path / f"s{step}")
        for key, value in target.items():
            assert torch.equal(value, torch.full((1024, 1024), float(step))), (step, key)


def test_a_tensor_dropped_right_after_save_is_still_copied_whole(tmp_path):
    """The stager holds the tensors until their copy completed: memory the caller frees
    after ``save()`` returns is not reused under the copy."""
    device = torch.device("cuda")
    stager = Stager(async_staging=True)
    with AsyncCheckpointer(executor="thread", no_dist=True, stager=stager) as ckpt:
        state = {"x": torch.full((64 << 20,), 7.0, device=device)}
        fut = ckpt.save(state, checkpoint_id=tmp_path / "a")
        del state
        junk = torch.full((64 << 20,), -1.0, device=device)  # may take the freed block
        fut.result(timeout=120)
        del junk
    target = {"x": torch.empty(64 << 20)}
    async_ckpt.load(target, checkpoint_id=tmp_path / "a")
    assert torch.equal(target["x"], torch.full((64 << 20,), 7.0))


def test_a_load_into_cuda_is_complete_when_it_returns_and_ordered_after_the_callers_work(
    tmp_path,
):
    """Loads into CUDA tensors read into page-locked buffers and copy on side streams;
    those wait for the caller's stream (a kernel queued there still reads the old
    values) and the load returns only once every copy landed."""
    device = torch.device("cuda")
    stored = {
        "w": torch.randn(4096, 1024),  # 16 MiB: several 8 MiB checksum blocks
        "i": torch.arange(100_000, dtype=torch.int64),
        "h": torch.randn(3000, dtype=torch.float16),
        "b": torch.randn(513, 7).to(torch.bfloat16),
    }
    async_ckpt.save(stored, checkpoint_id=tmp_path / "c")
    target = {k: torch.zeros_like(v, device=device) for k, v in stored.items()}
    busy = torch.randn(2048, 2048, device=device)
    for _ in range(50):  # queued on the caller's stream; then a read of the old "w"
        busy = torch.tanh(busy @ busy)
    old_sum = target["w"].sum()  # zeros, if the load waited for the caller's stream
    async_ckpt.load(target, checkpoint_id=tmp_path / "c")
    assert old_sum.item() == 0.0
    for key, value in stored.items():
        assert torch.equal(target[key].cpu(), value), key
