"""AsyncCheckpointer.start(state) pre-warms the worker and the staging memory."""

from __future__ import annotations

import torch

import async_ckpt as ac


def test_start_with_state_allocates_arenas_before_the_first_save(tmp_path):
    state = {"w": torch.randn(256, 256), "b": torch.randn(256), "step": 1}
    with ac.AsyncCheckpointer(executor="thread") as ckpt:
        ckpt.start(state)
        assert ckpt.stager.arenas_allocated == 1
        generation = ckpt.stager.generation
        ckpt.save(state, checkpoint_id=tmp_path / "a").result()
        assert ckpt.stager.arenas_allocated == 1, "the first save must reuse the reserved arena"
        assert ckpt.stager.generation == generation
    target = {"w": torch.zeros(256, 256), "b": torch.zeros(256), "step": 0}
    ac.load(target, checkpoint_id=tmp_path / "a")
    assert torch.equal(target["w"], state["w"]) and target["step"] == 1
