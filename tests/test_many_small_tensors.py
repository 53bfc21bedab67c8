"""The paths taken by states of many small tensors: packed writes, reads of small
chunks together, and a save's result carried as the committed metadata's bytes."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import read_meta

import async_ckpt
from async_ckpt import AsyncCheckpointer, ChecksumMismatchError, MetadataError
from async_ckpt.format.decode import decode_metadata
from async_ckpt.format.encoded import EncodedEntries
from async_ckpt.format.names import METADATA_FILE
from async_ckpt.pipeline import waves
from async_ckpt.planning.read_plan import SMALL_CHUNK_BYTES
from async_ckpt.staging.layout import plan_layout, tied_items
from async_ckpt.staging.views import typed_views
from async_ckpt.state.describe import describe
from async_ckpt.state.flatten import flatten


def _mixed_state() -> dict:
    """Small tensors of several dtypes (some not contiguous, one empty) around large ones."""
    g = torch.Generator().manual_seed(0)
    state = {f"small{i}": torch.randn(7, generator=g) for i in range(300)}
    state["ints"] = torch.arange(5, dtype=torch.int64)
    state["halves"] = torch.randn(9, generator=g).half()
    state["strided"] = torch.randn(6, 4, generator=g).t()  # not contiguous
    state["empty"] = torch.zeros(0, 3)
    state["big0"] = torch.randn(SMALL_CHUNK_BYTES // 4 + 1, generator=g)
    state["between"] = torch.randn(3, generator=g)
    for i in range(3):  # small windows, but above what the loading thread reads itself
        state[f"mid{i}"] = torch.randn(25_000, generator=g)
    state["big1"] = torch.randn(2, SMALL_CHUNK_BYTES // 8 + 3, generator=g)
    state["step"] = 7
    return state


def _zeros_like(state: dict) -> dict:
    return {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in state.items()
    }


@pytest.mark.parametrize("how", ["save", "async_save"])
def test_mixed_small_and_large_tensors_round_trip_exactly(tmp_path, how):
    state = _mixed_state()
    if how == "save":
        async_ckpt.save(state, checkpoint_id=tmp_path / "c", no_dist=True)
    else:
        with AsyncCheckpointer(no_dist=True) as ckpt:
            ckpt.save(state, checkpoint_id=tmp_path / "c").result()
    target = _zeros_like(state)
    async_ckpt.load(target, checkpoint_id=tmp_path / "c", no_dist=True)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert target[key].dtype == value.dtype
            assert torch.equal(target[key], value), key
    assert target["step"] == 7


def test_a_damaged_small_tensor_among_many_is_named(tmp_path):
    """Small chunks are read in one window; each is still checked against its own sums."""
    state = _mixed_state()
    async_ckpt.save(state, checkpoint_id=tmp_path / "c", no_dist=True)
    chunk = read_meta(tmp_path / "c")["entries"]["small123"]["chunks"][0]
    with open(tmp_path / "c" / chunk["file"], "r+b") as f:
        f.seek(chunk["offset"] + 5)
        byte = f.read(1)[0]
        f.seek(chunk["offset"] + 5)
        f.write(bytes([byte ^ 0x01]))
    with pytest.raises(ChecksumMismatchError, match="small123"):
        async_ckpt.load(_zeros_like(state), checkpoint_id=tmp_path / "c", no_dist=True)


def test_a_save_result_travels_as_the_committed_bytes(tmp_path):
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(50)}
    with AsyncCheckpointer(no_dist=True, executor="process") as ckpt:
        meta = ckpt.save(state, checkpoint_id=tmp_path / "c").result()
    assert isinstance(meta.entries, EncodedEntries)
    committed = (tmp_path / "c" / METADATA_FILE).read_bytes()
    assert meta.entries == decode_metadata(committed).entries
    assert sorted(meta.entries) == sorted(state)
    assert meta.entries["t7"].shape == (3,)
    # pickled, it is the bytes, not an object per entry
    assert len(pickle.dumps(meta.entries)) < len(committed) + 100


def test_a_save_result_lists_entries_in_one_order_whatever_the_path(tmp_path):
    state = {"z": torch.ones(2), "a": torch.zeros(3), "m": torch.ones(1)}
    synced = async_ckpt.save(state, checkpoint_id=tmp_path / "s", no_dist=True)
    with AsyncCheckpointer(no_dist=True, executor="process") as ckpt:
        through_worker = ckpt.save(state, checkpoint_id=tmp_path / "p").result()
    assert list(synced.entries) == list(through_worker.entries) == ["a", "m", "z"]
    copied = through_worker.entries.copy()
    assert (
        type(copied) is dict
        and copied == decode_metadata((tmp_path / "p" / METADATA_FILE).read_bytes()).entries
    )


@pytest.mark.parametrize("cap", [0, 100])
def test_packing_small_tensors_stops_at_its_memory_cap(tmp_path, monkeypatch, cap):
    monkeypatch.setattr(waves, "MAX_PACKED_BYTES", cap)
    state = {f"t{i}": torch.full((5,), float(i)) for i in range(20)}  # 20 bytes each
    async_ckpt.save(state, checkpoint_id=tmp_path / "c", no_dist=True)
    target = {k: torch.zeros(5) for k in state}
    async_ckpt.load(target, checkpoint_id=tmp_path / "c", no_dist=True)
    assert all(torch.equal(target[k], v) for k, v in state.items())


def test_encoded_entries_decode_with_the_loaders_checks():
    entries = EncodedEntries(b'{"format": "async_ckpt", "version": 2}')
    restored = pickle.loads(pickle.dumps(entries))  # cheap to build: nothing decoded yet
    with pytest.raises(MetadataError):
        len(restored)


def test_typed_views_cut_slots_of_each_dtype_around_gaps():
    data = torch.zeros(256, dtype=torch.uint8)
    like = [torch.ones(2, 3), torch.ones(4, dtype=torch.float16), torch.ones(5), torch.ones(3)]
    slots = [(0, 24), (32, 8), (64, 20), (96, 12)]  # float16 between the float32 slots
    views = typed_views(data, slots, like)
    for view, t, (off, nbytes) in zip(views, like, slots, strict=True):
        assert view.dtype == t.dtype and view.shape == t.shape
        view.copy_(t * 7)
        assert view.untyped_storage().data_ptr() == data.untyped_storage().data_ptr()
        assert torch.equal(data[off : off + nbytes].view(t.dtype).view(t.shape), t * 7)
    assert int(data[24:32].sum()) == 0 and int(data[84:96].sum()) == 0  # gaps untouched


def test_typed_views_of_overlapping_slots_are_made_one_by_one():
    data = torch.zeros(64, dtype=torch.uint8)
    views = typed_views(data, [(0, 8), (4, 8)], [torch.ones(2), torch.ones(2)])
    views[1].fill_(1.0)
    assert torch.equal(data[4:12].view(torch.float32), torch.ones(2))
    assert torch.equal(views[0], torch.tensor([0.0, 1.0]))


def test_an_empty_tensor_beside_another_is_not_a_tie():
    items, tensors = describe(flatten({"e": torch.zeros(0), "w": torch.ones(4)}))
    layout = plan_layout(items.items, tensors)
    assert layout.waves[0][1][0] == layout.waves[0][1][1]  # the same offset...
    assert tied_items(layout, items.items) == []  # ...but nothing shared
    w = torch.ones(4)
    items, tensors = describe(flatten({"a": w[:], "b": w[:]}))
    assert tied_items(plan_layout(items.items, tensors), items.items) == [0, 1]
