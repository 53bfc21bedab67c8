"""Bad state dicts: refused at the save call with a typed error, before anything
reaches the disk; and states whose structure changes between async saves.

Hostile checkpoints on the load side are in tests/test_hostile.py.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
from helpers import assert_same_tensor, random_tensor
from torch import nn

import async_ckpt
from async_ckpt import CheckpointError, StateDictError, UnsafeObjectError


def _self_containing():
    d = {"a": torch.ones(2)}
    d["me"] = d
    return d


BAD_STATES = {
    "tuple key": ({(1, 2): torch.ones(2)}, StateDictError, "str or int"),
    "float key": ({"m": {1.5: 1}}, StateDictError, "str or int"),
    "None key": ({None: 1}, StateDictError, "str or int"),
    "bool key": ({True: 1}, StateDictError, "str or int"),
    "bytes key": ({b"k": 1}, StateDictError, "str or int"),
    "dotted key vs nesting": ({"a.b": 1, "a": {"b": 2}}, StateDictError, "'a.b'"),
    "int key vs str key": ({"o": {1: 1, "1": 2}}, StateDictError, "'o.1'"),
    "module vs flat key": (
        {"m": nn.Linear(2, 2), "m.weight": torch.ones(2, 2)},
        StateDictError,
        "'m.weight'",
    ),
    "contains itself": (_self_containing(), StateDictError, "contains itself"),
    "meta tensor": ({"m": nn.Linear(2, 2, device="meta")}, StateDictError, "'m.weight'"),
    "sparse tensor": ({"s": torch.eye(3).to_sparse()}, StateDictError, "'s'"),
    "lambda": ({"f": lambda x: x}, UnsafeObjectError, "function"),
    "open file": ({"f": open(os.devnull)}, UnsafeObjectError, "TextIOWrapper"),  # noqa: SIM115
    "lock": ({"f": threading.Lock()}, UnsafeObjectError, "lock"),
    "generator": ({"f": (i for i in range(3))}, UnsafeObjectError, "generator"),
    "top is a list": ([torch.ones(1)], StateDictError, "dict"),
}


@pytest.mark.parametrize("bad", list(BAD_STATES.values()), ids=list(BAD_STATES))
def test_bad_state_dicts_are_refused_at_the_save_call(ckpt, tmp_path, bad):
    state, error, words = bad
    path = tmp_path / "ckpt"
    with pytest.raises(error, match=words):
        ckpt.save(state, checkpoint_id=path)
    with pytest.raises(error, match=words):
        async_ckpt.save(state, checkpoint_id=path)
    assert not path.exists()  # refused before the storage was touched
    good = {"w": torch.arange(3.0)}
    ckpt.save(good, checkpoint_id=path).result(timeout=60)  # the checkpointer still works
    got = {"w": torch.zeros(3)}
    async_ckpt.load(got, checkpoint_id=path)
    assert torch.equal(got["w"], good["w"])


def test_an_unsupported_leaf_error_names_its_key(tmp_path):
    with pytest.raises(CheckpointError, match="model.hook"):
        async_ckpt.save({"model": {"hook": threading.Lock()}}, checkpoint_id=tmp_path / "c")


def test_a_state_whose_structure_changes_between_async_saves(ckpt, tmp_path):
    """Keys, shapes and dtypes change while the previous save still writes: arenas re-plan."""
    gen = ckpt.stager.generation
    states = [
        {"w": random_tensor(torch.float32, (64, 64), 1), "step": 1},
        {"w": random_tensor(torch.float32, (32,), 2), "extra": random_tensor(torch.int8, (9,), 3)},
        {"w": random_tensor(torch.bfloat16, (64, 64), 4), "step": 3, "lr": 1.5},
        {"w": random_tensor(torch.float32, (64, 64), 5), "step": 4},
    ]
    expected = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in states]
    futures = []
    for n, state in enumerate(states):
        futures.append(ckpt.save(state, checkpoint_id=tmp_path / f"s{n}"))
        for value in state.values():  # training goes on in place
            if torch.is_tensor(value):
                value.zero_()
    for fut in futures:
        fut.result(timeout=60)
    assert ckpt.stager.generation >= gen + len(states) - 1
    for n, want in enumerate(expected):
        got = {k: torch.zeros_like(v) if torch.is_tensor(v) else None for k, v in want.items()}
        async_ckpt.load(got, checkpoint_id=tmp_path / f"s{n}")
        for key, value in want.items():
            if torch.is_tensor(value):
                assert_same_tensor(got[key], value)
            else:
                assert got[key] == value
