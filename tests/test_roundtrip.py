"""Synchronous save then load gives back every kind of leaf, exactly."""

from __future__ import annotations

import argparse
import collections
import datetime
import decimal
import fractions
import math
import pathlib
from typing import NamedTuple

import numpy as np
import pytest
import torch
from helpers import DTYPES, assert_same_tensor, random_tensor

import async_ckpt
from async_ckpt import KeyMismatchError, LoadResult, ShapeMismatchError


class Pair(NamedTuple):
    first: torch.Tensor
    second: int


def roundtrip(state, target, path, **load_kwargs):
    async_ckpt.save(state, checkpoint_id=path)
    return async_ckpt.load(target, checkpoint_id=path, **load_kwargs)


# ---------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
def test_every_dtype_round_trips_bit_exact(dtype, ckpt_dir):
    saved = random_tensor(dtype, (5, 7), seed=1)
    target = {"t": torch.zeros(5, 7, dtype=dtype), "fresh": None}
    roundtrip({"t": saved, "fresh": saved}, target, ckpt_dir)
    assert_same_tensor(target["t"], saved)
    assert_same_tensor(target["fresh"], saved)  # made by the load: no tensor to fill


def test_zero_dim_and_empty_tensors(ckpt_dir):
    state = {"scalar": torch.tensor(3.25), "empty": torch.empty(0, 3), "int0": torch.tensor(-7)}
    target = {"scalar": torch.tensor(0.0), "empty": torch.ones(0, 3), "int0": torch.tensor(0)}
    roundtrip(state, target, ckpt_dir)
    assert target["scalar"].item() == 3.25 and target["scalar"].dim() == 0
    assert target["empty"].shape == (0, 3)
    assert target["int0"].item() == -7 and target["int0"].dtype == torch.int64


def test_non_contiguous_tensors_save_their_logical_values(ckpt_dir):
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    state = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.arange(3.0).expand(4, 3),
        "channels_last": torch.arange(2 * 3 * 4 * 5.0)
        .reshape(2, 3, 4, 5)
        .to(memory_format=torch.channels_last),
    }
    assert not any(t.is_contiguous() for t in state.values())
    target = {k: torch.zeros(v.shape) for k, v in state.items()}
    roundtrip(state, target, ckpt_dir)
    for key, value in state.items():
        assert torch.equal(target[key], value), key


def test_load_into_a_non_contiguous_target_fills_its_storage(ckpt_dir):
    saved = torch.arange(12.0).reshape(3, 4)
    buffer = torch.zeros(4, 3)
    roundtrip({"t": saved}, {"t": buffer.t()}, ckpt_dir)
    assert torch.equal(buffer.t(), saved)


def test_views_sharing_one_storage_load_back_with_correct_values(ckpt_dir):
    base = torch.arange(20.0)
    state = {"base": base, "head": base[2:8], "grid": base.view(4, 5).t(), "every3": base[::3]}
    fresh = {k: torch.zeros(v.shape) for k, v in state.items()}
    roundtrip(state, fresh, ckpt_dir)
    for key, value in state.items():
        assert torch.equal(fresh[key], value), key

    # Loading into views of one buffer leaves the buffer consistent with the saved one.
    buffer = torch.zeros(20)
    views = {"base": buffer, "head": buffer[2:8], "grid": buffer.view(4, 5).t()}
    views["every3"] = buffer[::3]
    async_ckpt.load(views, checkpoint_id=ckpt_dir)
    assert torch.equal(buffer, base)
    assert torch.equal(views["head"], base[2:8])


def test_load_keeps_the_target_dtype_casting_values(ckpt_dir):
    saved = torch.tensor([1.5, -2.25, 3.0], dtype=torch.float32)
    target = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.bfloat16)}
    roundtrip({"a": saved, "b": saved}, target, ckpt_dir, allow_lossy_cast=True)
    assert target["a"].dtype == torch.float64
    assert target["a"].tolist() == [1.5, -2.25, 3.0]
    assert target["b"].dtype == torch.bfloat16
    assert torch.equal(target["b"], saved.to(torch.bfloat16))


def test_load_fills_the_callers_tensor_in_place(ckpt_dir):
    target_tensor = torch.zeros(4)
    target = {"t": target_tensor}
    roundtrip({"t": torch.arange(4.0)}, target, ckpt_dir)
    assert target["t"] is target_tensor
    assert target_tensor.device.type == "cpu"
    assert target_tensor.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_keeps_the_target_device(ckpt_dir):
    target = {"t": torch.zeros(4, device="cuda", dtype=torch.float64)}
    roundtrip({"t": torch.arange(4.0).cuda()}, target, ckpt_dir)
    assert target["t"].device.type == "cuda" and target["t"].dtype == torch.float64
    assert target["t"].cpu().tolist() == [0.0, 1.0, 2.0, 3.0]


# ---------------------------------------------------------------------------- containers, values


def test_nested_containers_keep_their_types(ckpt_dir):
    state = {
        "d": {"a": {"b": torch.ones(2)}, 3: "int key"},
        "l": [torch.zeros(1), [1, 2, (3, "x")]],
        "t": (torch.full((2,), 5.0), {"in": "tuple"}),
        "nt": Pair(torch.arange(3.0), 9),
        "od": collections.OrderedDict([("z", 1), ("a", 2)]),
        "size": torch.Size([2, 3]),
    }
    target = {
        "d": {"a": {"b": torch.zeros(2)}, 3: None},
        "l": [torch.ones(1), [0, 0, (0, "")]],
        "t": (torch.zeros(2), {"in": None}),
        "nt": Pair(torch.zeros(3), 0),
        "od": collections.OrderedDict([("z", 0), ("a", 0)]),
        "size": torch.Size([0, 0]),
    }
    roundtrip(state, target, ckpt_dir)
    assert torch.equal(target["d"]["a"]["b"], torch.ones(2)) and target["d"][3] == "int key"
    assert torch.equal(target["l"][0], torch.zeros(1)) and target["l"][1] == [1, 2, (3, "x")]
    assert isinstance(target["t"], tuple) and torch.equal(target["t"][0], torch.full((2,), 5.0))
    assert target["t"][1] == {"in": "tuple"}
    assert type(target["nt"]) is Pair and target["nt"].second == 9
    assert torch.equal(target["nt"].first, torch.arange(3.0))
    assert type(target["size"]) is torch.Size and target["size"] == (2, 3)
    assert type(target["od"]) is collections.OrderedDict and list(target["od"].items()) == [
        ("z", 1),
        ("a", 2),
    ]


def test_python_scalars_strings_bytes_none_round_trip(ckpt_dir):
    state = {
        "int": 7,
        "big": 2**80 + 1,
        "neg": -3,
        "float": 0.1,
        "negzero": -0.0,
        "true": True,
        "false": False,
        "str": "héllo ✓ \x00 end",
        "bytes": bytes(range(256)),
        "none": None,
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
    }
    target = dict.fromkeys(state, 0)
    roundtrip(state, target, ckpt_dir)
    for key in ("int", "big", "neg", "float", "str", "bytes", "none", "inf", "ninf"):
        assert target[key] == state[key] and type(target[key]) is type(state[key]), key
    assert target["true"] is True and target["false"] is False
    assert math.copysign(1.0, target["negzero"]) == -1.0
    assert isinstance(target["nan"], float) and math.isnan(target["nan"])


def test_numpy_arrays_round_trip_in_place_and_fresh(ckpt_dir):
    state = {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "bool": np.array([True, False, True]),
        "c128": np.array([1 + 2j, -3j]),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "u64": np.array([0, 2**64 - 1], dtype=np.uint64),  # stored as an object entry
        "scalar0d": np.array(2.5),
        "npscalar": np.float32(1.25),
    }
    in_place = np.zeros((3, 4), dtype=np.float32)
    target = {k: None for k in state} | {"f32": in_place}
    roundtrip(state, target, ckpt_dir)
    assert target["f32"] is in_place and np.array_equal(in_place, state["f32"])
    for key, value in state.items():
        assert isinstance(target[key], type(value)), key
        assert np.array_equal(target[key], value), key
        assert target[key].dtype == value.dtype, key


def test_allow_listed_objects_round_trip(ckpt_dir):
    state = {
        "ns": argparse.Namespace(lr=0.1, name="run", layers=[1, 2]),
        "when": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2020, 2, 29),
        "span": datetime.timedelta(hours=3),
        "dec": decimal.Decimal("1.10"),
        "frac": fractions.Fraction(1, 3),
        "set": {1, 2, 3},
        "frozen": frozenset({"a"}),
        "complex": 1 + 2j,
        "deque": collections.deque([1, 2]),
        "path": pathlib.PurePosixPath("/a/b"),
        "rng": np.random.default_rng(5),
    }
    target = dict.fromkeys(state)
    roundtrip(state, target, ckpt_dir)
    for key in state:
        if key == "rng":
            continue
        assert target[key] == state[key] and type(target[key]) is type(state[key]), key
    assert target["rng"].integers(1000, size=5).tolist() == (
        np.random.default_rng(5).integers(1000, size=5).tolist()
    )


def test_module_and_adam_load_into_fresh_objects(ckpt_dir):
    torch.manual_seed(0)

    def build():
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
        )
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, optim = build()
    optim.param_groups[0]["lr"] = 1e-3
    for _ in range(3):
        optim.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optim.step()
    async_ckpt.save({"model": model, "optim": optim, "step": 3}, checkpoint_id=ckpt_dir)

    model2, optim2 = build()
    assert not optim2.state  # the load must create the moments
    state = {"model": model2, "optim": optim2, "step": 0}
    result = async_ckpt.load(state, checkpoint_id=ckpt_dir)

    assert result == LoadResult([], [])
    assert state["step"] == 3
    for (name, a), (_, b) in zip(
        model.state_dict().items(), model2.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert optim2.param_groups[0]["lr"] == 1e-3
    saved, loaded = optim.state_dict()["state"], optim2.state_dict()["state"]
    assert saved.keys() == loaded.keys() and len(saved) == 6
    for pid in saved:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[pid][name], loaded[pid][name]), (pid, name)
    # The optimizer works on the loaded state (moments attached to model2's parameters).
    optim2.zero_grad()
    model2(torch.randn(5, 4)).sum().backward()
    optim2.step()
    assert optim2.state_dict()["state"][0]["step"].item() == 4


# ---------------------------------------------------------------------------- key and shape checks


def test_strict_false_reports_missing_and_unexpected_keys(ckpt_dir):
    async_ckpt.save({"a": torch.ones(2), "b": 1, "gone": 5}, checkpoint_id=ckpt_dir)
    target = {"a": torch.zeros(2), "b": 0, "new": torch.zeros(1)}
    result = async_ckpt.load(target, checkpoint_id=ckpt_dir, strict=False)
    assert isinstance(result, LoadResult)
    assert result.missing_keys == ["new"]
    assert result.unexpected_keys == ["gone"]
    assert torch.equal(target["a"], torch.ones(2)) and target["b"] == 1
    assert torch.equal(target["new"], torch.zeros(1)) and "gone" not in target


def test_exact_load_raises_key_mismatch_naming_both_sides(ckpt_dir):
    async_ckpt.save({"a": torch.ones(2), "gone": 5}, checkpoint_id=ckpt_dir)
    target = {"a": torch.zeros(2), "new": 0}
    with pytest.raises(KeyMismatchError) as info:
        async_ckpt.load(target, checkpoint_id=ckpt_dir, strict="exact")
    assert info.value.missing == ["new"] and info.value.unexpected == ["gone"]
    assert "new" in str(info.value) and "gone" in str(info.value)
    assert isinstance(info.value, KeyError)
    assert torch.equal(target["a"], torch.zeros(2))  # nothing was loaded


def test_exact_load_refuses_keys_only_the_checkpoint_has(ckpt_dir):
    async_ckpt.save({"a": torch.ones(2), "gone": 5}, checkpoint_id=ckpt_dir)
    target = {"a": torch.zeros(2)}
    with pytest.raises(KeyMismatchError, match="gone") as info:
        async_ckpt.load(target, checkpoint_id=ckpt_dir, strict="exact")
    assert info.value.missing == [] and info.value.unexpected == ["gone"]


def test_default_load_as_dcp_target_keys_decide(ckpt_dir):
    """The state dict's keys decide: extra stored keys are fine, a missing one is named."""
    async_ckpt.save(
        {"model": {"w": torch.ones(2)}, "optim": {"m": torch.ones(3)}}, checkpoint_id=ckpt_dir
    )
    target = {"model": {"w": torch.zeros(2)}}
    result = async_ckpt.load(target, checkpoint_id=ckpt_dir)
    assert torch.equal(target["model"]["w"], torch.ones(2)) and "optim" not in target
    assert result.unexpected_keys == ["optim.m"] and result.missing_keys == []
    asks_more = {"model": {"w": torch.zeros(2), "b": torch.zeros(1)}}
    with pytest.raises(
        KeyMismatchError, match=r"Missing key in checkpoint state_dict: \['model\.b'\]"
    ):
        async_ckpt.load(asks_more, checkpoint_id=ckpt_dir)
    assert torch.equal(asks_more["model"]["w"], torch.zeros(2))  # nothing was loaded


def test_strict_accepts_only_true_false_or_exact(ckpt_dir):
    async_ckpt.save({"a": torch.ones(2)}, checkpoint_id=ckpt_dir)
    with pytest.raises(ValueError, match="strict must be"):
        async_ckpt.load({"a": torch.zeros(2)}, checkpoint_id=ckpt_dir, strict="both")


def test_shape_mismatch_raises_naming_the_key(ckpt_dir):
    async_ckpt.save({"layer": {"w": torch.ones(3, 4)}}, checkpoint_id=ckpt_dir)
    with pytest.raises(ShapeMismatchError, match=r"layer\.w.*\[4, 3\].*\[3, 4\]"):
        async_ckpt.load({"layer": {"w": torch.zeros(4, 3)}}, checkpoint_id=ckpt_dir)


def test_save_returns_the_committed_metadata(ckpt_dir):
    meta = async_ckpt.save({"t": torch.ones(3), "n": 1}, checkpoint_id=ckpt_dir)
    assert isinstance(meta, async_ckpt.Metadata)
    assert set(meta.entries) == {"t", "n"}
    assert meta.world_size == 1
    assert sum((ckpt_dir / name).stat().st_size for name in meta.files) == meta.total_bytes == 12
