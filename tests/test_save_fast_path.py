"""Per-save caches (descriptors, arena layout) never serve a stale picture of the state."""

from __future__ import annotations

import datetime
import gc
import weakref

import pytest
import torch

import async_ckpt
from async_ckpt import AsyncCheckpointer, Stager
from async_ckpt.state.describe import DescribeCache, describe
from async_ckpt.state.flatten import flatten


def test_describe_cache_reuses_items_of_unchanged_tensors():
    cache = DescribeCache()
    weight, bias = torch.randn(4, 3), torch.randn(3)
    first, _ = describe(flatten({"w": weight, "b": bias}), cache)
    second, tensors = describe(flatten({"w": weight, "b": bias}), cache)
    assert all(a is b for a, b in zip(first.items, second.items, strict=True))
    assert tensors[0].data_ptr() == weight.data_ptr()


def test_describe_cache_rebuilds_what_changed():
    cache = DescribeCache()
    weight = torch.randn(4, 3)
    first, _ = describe(flatten({"w": weight, "x": torch.zeros(2)}), cache)
    weight.resize_(6, 3)  # same object, new shape
    second, _ = describe(flatten({"w": weight, "x": torch.zeros(2, dtype=torch.int8)}), cache)
    assert second.items[0].shape == (6, 3)
    assert second.items[1].dtype == "int8"  # same key, a different tensor
    third, _ = describe(flatten({"renamed": weight}), cache)
    assert third.items[0].key == "renamed"


def test_swapped_storage_is_staged_from_the_new_data(tmp_path):
    """``param.data = ...`` keeps the object and shape but moves the bytes."""
    model = torch.nn.Linear(8, 4)
    with AsyncCheckpointer(executor="thread", stager=Stager(async_staging=True)) as ckpt:
        ckpt.save({"model": model}, checkpoint_id=tmp_path / "a").result(timeout=60)
        model.weight.data = torch.full_like(model.weight, 7.0)
        ckpt.save({"model": model}, checkpoint_id=tmp_path / "b").result(timeout=60)
    loaded = {"model": torch.nn.Linear(8, 4)}
    async_ckpt.load(loaded, checkpoint_id=tmp_path / "b")
    assert torch.equal(loaded["model"].weight, torch.full((4, 8), 7.0))
    assert torch.equal(loaded["model"].bias, model.bias)


@pytest.mark.parametrize("async_staging", [False, True])
def test_a_tie_broken_in_place_is_staged_apart(tmp_path, async_staging):
    """Two views of one storage share a slot; moving one (``.data``) must split them."""
    w = torch.randn(16)
    state = {"emb": w[:], "head": w[:], "other": torch.randn(3)}
    with AsyncCheckpointer(executor="thread", stager=Stager(async_staging=async_staging)) as ckpt:
        for step in range(3):  # the first saves build and reuse the tied layout
            ckpt.save(state, checkpoint_id=tmp_path / f"s{step}").result(timeout=60)
        state["head"].data = torch.full((16,), 5.0)  # same object, same shape, new memory
        ckpt.save(state, checkpoint_id=tmp_path / "after").result(timeout=60)
    out = {"emb": torch.zeros(16), "head": torch.zeros(16), "other": torch.zeros(3)}
    async_ckpt.load(out, checkpoint_id=tmp_path / "after")
    assert torch.equal(out["emb"], w)
    assert torch.equal(out["head"], torch.full((16,), 5.0))


def test_layout_follows_newly_tied_tensors(tmp_path):
    """Two keys that start sharing one storage are staged (and loaded) consistently."""
    a, b = torch.randn(16), torch.randn(16)
    with AsyncCheckpointer(executor="thread") as ckpt:
        ckpt.save({"a": a, "b": b}, checkpoint_id=tmp_path / "1").result(timeout=60)
        b2 = a.view(16)  # a new tensor object for "b", aliasing "a"
        a.add_(1)
        ckpt.save({"a": a, "b": b2}, checkpoint_id=tmp_path / "2").result(timeout=60)
    out = {"a": torch.zeros(16), "b": torch.zeros(16)}
    async_ckpt.load(out, checkpoint_id=tmp_path / "2")
    assert torch.equal(out["a"], a) and torch.equal(out["b"], a)


def test_fingerprints_are_reused_only_for_an_unchanged_structure():
    cache = DescribeCache()
    w = torch.randn(4)
    states = [describe(flatten({"w": w, "step": i}), cache)[0] for i in range(3)]
    assert states[0].known_fingerprints is None  # first sight: the worker hashes it
    assert states[2].known_fingerprints == states[1].known_fingerprints
    fresh = describe(flatten({"w": w, "step": 0}))[0]  # no cache: computed from scratch
    assert states[2].keys_fingerprint() == fresh.keys_fingerprint()
    assert states[2].plan_fingerprint() == fresh.plan_fingerprint()
    added = describe(flatten({"w": w, "step": 3, "epoch": 1}), cache)[0]
    assert added.known_fingerprints is None
    assert added.keys_fingerprint() != fresh.keys_fingerprint()


def test_a_budget_split_drops_the_known_fingerprints():
    from async_ckpt.staging.layout import split_to_fit

    cache = DescribeCache()
    big = torch.randn(64, 64)
    for _ in range(2):
        state, tensors = describe(flatten({"big": big}), cache)
    assert state.known_fingerprints is not None
    split, _ = split_to_fit(state, tensors, 4096)
    assert split.known_fingerprints is None
    assert split.plan_fingerprint() != state.plan_fingerprint()


def test_describe_cache_keeps_no_tensor_alive():
    import gc
    import weakref

    cache = DescribeCache()
    temp = torch.randn(1000)
    alive = weakref.ref(temp)
    describe(flatten({"t": temp}), cache)
    del temp
    gc.collect()
    assert alive() is None


@pytest.mark.multiprocess
def test_the_worker_gets_the_structure_once_and_values_every_save(tmp_path, monkeypatch):
    """Per save only what changes travels; a new structure is sent once, when it appears."""
    from async_ckpt.executor import protocol, wire

    sent: list[object] = []
    send = wire.send

    def recorded(sock, message, fds=None):
        sent.append(message)
        send(sock, message, fds)

    monkeypatch.setattr(wire, "send", recorded)
    w = torch.randn(8)
    with AsyncCheckpointer(executor="process") as ckpt:
        for step in range(3):
            ckpt.save(
                {"w": w, "step": step, "day": datetime.date(2024, 1, step + 1)},
                checkpoint_id=tmp_path / str(step),
            ).result(timeout=120)
        ckpt.save({"w": w, "x": torch.ones(2), "step": 3}, checkpoint_id=tmp_path / "3").result(
            timeout=120
        )
    structures = [m for m in sent if isinstance(m, protocol.Structure)]
    saves = [m for m in sent if isinstance(m, protocol.Save)]
    assert [len(s.items) for s in structures] == [1, 2]
    assert [s.structure for s in saves] == [structures[0].generation] * 3 + [
        structures[1].generation
    ]
    for step in range(3):
        out = {"w": torch.zeros(8), "step": -1, "day": None}
        async_ckpt.load(out, checkpoint_id=tmp_path / str(step))
        assert out["step"] == step and out["day"] == datetime.date(2024, 1, step + 1)
        assert torch.equal(out["w"], w)
    out = {"w": torch.zeros(8), "x": torch.zeros(2), "step": -1}
    async_ckpt.load(out, checkpoint_id=tmp_path / "3")
    assert out["step"] == 3 and torch.equal(out["x"], torch.ones(2))


@pytest.mark.parametrize("async_staging", [False, True])
def test_steady_saves_reuse_the_copy_plan_and_stage_the_current_values(tmp_path, async_staging):
    """The second save of one structure reuses the cached copy plan (views and indices);
    values changed in place, parameters that require grad and a tensor replaced by a new
    object of the same shape all reach the checkpoint."""
    params = [torch.nn.Parameter(torch.randn(3, 5)) for _ in range(40)]
    buffers = {f"b{i}": torch.randn(7) for i in range(40)}

    def state():
        return {"p": {str(i): p for i, p in enumerate(params)}, "b": dict(buffers)}

    stager = Stager(async_staging=async_staging)
    with AsyncCheckpointer(executor="thread", no_dist=True, stager=stager) as ckpt:
        for name in ("a", "b"):  # one save per staging buffer
            ckpt.save(state(), checkpoint_id=tmp_path / name).result(timeout=60)
        plans = [dict(b.plans) for b in stager._buffers]
        with torch.no_grad():
            for p in params:
                p.mul_(2.0)
        ckpt.save(state(), checkpoint_id=tmp_path / "c").result(timeout=60)
        reused = [
            plan is plans[n].get(index)
            for n, buffer in enumerate(stager._buffers)
            for index, plan in buffer.plans.items()
        ]
        assert reused and all(reused)
        buffers["b3"] = torch.full((7,), 5.0)  # a new object under an old key
        ckpt.save(state(), checkpoint_id=tmp_path / "d").result(timeout=60)
    target = {
        "p": {str(i): torch.zeros(3, 5) for i in range(40)},
        "b": {f"b{i}": torch.zeros(7) for i in range(40)},
    }
    async_ckpt.load(target, checkpoint_id=tmp_path / "d")
    for i, p in enumerate(params):
        assert torch.equal(target["p"][str(i)], p.detach())
    for key, value in buffers.items():
        assert torch.equal(target["b"][key], value)


def _saved(path) -> dict:
    from async_ckpt.materialize import materialize

    return materialize(path)


def test_the_same_flat_dict_again_skips_the_walk_and_saves_current_values(tmp_path):
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(5)}
    with AsyncCheckpointer(executor="thread") as ckpt:
        for n in range(3):
            for t in state.values():
                t.add_(1.0)  # in place: same objects, new values
            ckpt.save(state, checkpoint_id=tmp_path / f"s{n}").result()
        # the first save walks and remembers, the next two reuse
        assert ckpt._shortcut.hits == 2
    for n in range(3):
        saved = _saved(tmp_path / f"s{n}")
        assert all(torch.equal(saved[k], state[k] - (2 - n)) for k in state)


@pytest.mark.parametrize(
    "change",
    ["new_tensor", "resize", "dtype_swap", "new_key", "dropped_key", "reordered", "value"],
)
def test_any_change_to_the_flat_dict_takes_the_full_walk(tmp_path, change):
    state = {"a": torch.zeros(4), "b": torch.ones(2, 2)}
    with AsyncCheckpointer(executor="thread") as ckpt:
        for n in range(2):
            ckpt.save(state, checkpoint_id=tmp_path / f"warm{n}").result()
        if change == "new_tensor":
            state["a"] = torch.full((4,), 5.0)
        elif change == "resize":
            state["a"].resize_(6)
            state["a"].fill_(6.0)
        elif change == "dtype_swap":
            state["b"].data = torch.ones(2, 2, dtype=torch.float64)
        elif change == "new_key":
            state["c"] = torch.arange(3)
        elif change == "dropped_key":
            del state["b"]
        elif change == "reordered":
            state = {"b": state["b"], "a": state["a"]}
        else:
            state["step"] = 7
        ckpt.save(state, checkpoint_id=tmp_path / "changed").result()
        assert ckpt._shortcut.hits == 1  # the second warm-up save only
    saved = _saved(tmp_path / "changed")
    assert sorted(saved) == sorted(state)
    for key, value in state.items():
        if torch.is_tensor(value):
            assert saved[key].dtype == value.dtype and torch.equal(saved[key], value), key
        else:
            assert saved[key] == value


def test_the_shortcut_keeps_no_tensor_alive():
    from async_ckpt.state.shortcut import FlatDictShortcut

    shortcut = FlatDictShortcut()
    tensor = torch.zeros(8)
    state, tensors = describe(flatten({"x": tensor}))
    shortcut.remember({"x": tensor}, state, [tensor])
    ref = weakref.ref(tensor)
    del tensor, tensors
    gc.collect()
    assert ref() is None
    assert shortcut.lookup({"x": torch.zeros(8)}) is None
