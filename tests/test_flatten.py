"""State dicts that cannot be saved are refused at save time, with a typed error."""

from __future__ import annotations

import pytest
import torch

import async_ckpt
from async_ckpt import StateDictError, UnsafeObjectError
from async_ckpt.format import allow_list
from async_ckpt.state.flatten import flatten, key_of


class NotAllowListed:
    """Picklable, but not on the allow-list: unpickling it could run arbitrary code."""

    def __init__(self, value: int) -> None:
        self.value = value


def _save_fails(state, ckpt_dir, error, match):
    with pytest.raises(error, match=match):
        async_ckpt.save(state, checkpoint_id=ckpt_dir)
    assert not (ckpt_dir / "metadata.json").exists()


@pytest.mark.parametrize("key", [1.5, (1, 2), None, b"k", True])
def test_keys_that_are_not_str_or_int_are_refused(key, ckpt_dir):
    _save_fails({"outer": {key: torch.ones(1)}}, ckpt_dir, StateDictError, "must be str or int")


def test_keys_colliding_after_flattening_are_refused(ckpt_dir):
    _save_fails({"a.b": 1, "a": {"b": 2}}, ckpt_dir, StateDictError, "'a.b'")


def test_an_int_key_colliding_with_a_str_key_is_refused(ckpt_dir):
    _save_fails({"d": {1: "x", "1": "y"}}, ckpt_dir, StateDictError, "'d.1'")


def test_a_state_dict_containing_itself_is_refused(ckpt_dir):
    loop: dict = {"x": 1}
    loop["self"] = loop
    _save_fails({"loop": loop}, ckpt_dir, StateDictError, "contains itself")


def test_the_top_must_be_a_mapping(ckpt_dir):
    _save_fails([torch.ones(1)], ckpt_dir, StateDictError, "must be a dict")


def test_an_unpicklable_leaf_is_refused(ckpt_dir):
    _save_fails({"fn": lambda x: x}, ckpt_dir, UnsafeObjectError, "not picklable")


def test_a_class_outside_the_allow_list_is_refused_at_save(ckpt_dir):
    _save_fails({"obj": NotAllowListed(3)}, ckpt_dir, UnsafeObjectError, "allow_global")


def test_allow_class_lets_a_trusted_class_through(ckpt_dir, monkeypatch):
    monkeypatch.setattr(allow_list, "_SAFE_GLOBALS", set(allow_list._SAFE_GLOBALS))
    async_ckpt.allow_class(NotAllowListed)
    target = {"obj": None}
    async_ckpt.save({"obj": NotAllowListed(3)}, checkpoint_id=ckpt_dir)
    async_ckpt.load(target, checkpoint_id=ckpt_dir)
    assert isinstance(target["obj"], NotAllowListed) and target["obj"].value == 3


def test_a_meta_device_tensor_is_refused(ckpt_dir):
    _save_fails({"w": torch.empty(3, device="meta")}, ckpt_dir, StateDictError, "meta device")


def test_a_sparse_tensor_is_refused(ckpt_dir):
    sparse = torch.eye(3).to_sparse()
    _save_fails({"s": sparse}, ckpt_dir, StateDictError, "dense")


@pytest.mark.filterwarnings("ignore:.*quantize:UserWarning")
def test_a_quantized_tensor_is_refused(ckpt_dir):
    q = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)
    _save_fails({"q": q}, ckpt_dir, StateDictError, "qint8")


def test_flatten_joins_paths_with_dots_and_records_containers():
    flat = flatten({"m": {"w": 1, 0: [2, (3,)]}})
    assert flat.leaves == {"m.w": 1, "m.0.0": 2, "m.0.1.0": 3}
    assert flat.paths["m.0.1.0"] == ("m", 0, 1, 0)
    assert flat.containers == {"": "dict", "m": "dict", "m.0": "list", "m.0.1": "tuple"}
    assert key_of(("optim", "state", 0, "exp_avg")) == "optim.state.0.exp_avg"
