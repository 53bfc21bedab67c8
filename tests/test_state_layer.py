"""The state layer's leaf kinds and the load's read plan, without any storage."""

from __future__ import annotations

import fractions

import numpy as np
import pytest
import torch

from async_ckpt.errors import ShapeMismatchError
from async_ckpt.format.metadata import Chunk, Metadata, ObjectEntry, TensorEntry, ValueEntry
from async_ckpt.format.objects import encode_plain
from async_ckpt.planning.read_plan import (
    SMALL_CHUNK_BYTES,
    match_keys,
    overlap,
    plan_reads,
    read_groups,
)
from async_ckpt.state.flatten import flatten
from async_ckpt.state.leaves import LeafKind, fills_in_place, leaf_kind, tensor_piece


@pytest.mark.parametrize(
    ("leaf", "kind"),
    [
        (torch.zeros(2), LeafKind.TENSOR),
        (torch.nn.Parameter(torch.zeros(2)), LeafKind.TENSOR),
        (np.zeros(3, dtype=np.float32), LeafKind.NDARRAY),
        (np.zeros(3, dtype=np.uint64), LeafKind.OBJECT),  # torch has no view for uint64
        (np.array(["a"], dtype=object), LeafKind.OBJECT),
        (3, LeafKind.VALUE),
        ("x" * 10, LeafKind.VALUE),
        ("x" * (65 * 1024), LeafKind.OBJECT),  # too big for the metadata
        (2**2000, LeafKind.OBJECT),
        (fractions.Fraction(1, 3), LeafKind.OBJECT),
    ],
)
def test_every_leaf_has_one_kind(leaf, kind):
    assert leaf_kind(leaf) is kind
    assert kind.has_bytes == (kind in (LeafKind.TENSOR, LeafKind.NDARRAY, LeafKind.DTENSOR))


def test_an_array_is_saved_in_native_order_and_loaded_in_place():
    big_endian = np.arange(4, dtype=">i4")
    saved = tensor_piece(big_endian, LeafKind.NDARRAY)
    assert saved.local.tolist() == [0, 1, 2, 3] and saved.shape == (4,)
    target = np.zeros(4, dtype=np.float32)
    loaded = tensor_piece(target, LeafKind.NDARRAY, for_load=True)
    loaded.local.fill_(7)
    assert target.tolist() == [7, 7, 7, 7]  # the same memory
    target.flags.writeable = False
    assert not fills_in_place(target, LeafKind.NDARRAY)


def _entry(path, shape, chunks):
    return TensorEntry(path, "float32", shape, tuple(chunks))


def _chunk(offsets, sizes, file, offset):
    nbytes = 4 * int(np.prod(sizes))
    return Chunk(offsets, sizes, file, offset, nbytes, (0,))


def _meta(entries):
    return Metadata(
        "s", 1, 1 << 23, {"f0": 1 << 20, "f1": 1 << 20, "obj": 10}, {"": "dict"}, entries
    )


def test_read_plan_fills_in_place_creates_adopts_and_reads_only_overlapping_chunks():
    rows = [_chunk((0, 0), (2, 4), "f0", 0), _chunk((2, 0), (2, 4), "f1", 0)]
    meta = _meta(
        {
            "w": _entry(("w",), (4, 4), rows),
            "new": _entry(("new",), (2,), [_chunk((0,), (2,), "f0", 32)]),
            "opt.state.0.m": _entry(("opt", "state", 0, "m"), (2,), [_chunk((0,), (2,), "f1", 32)]),
            "step": ValueEntry(("step",), encode_plain(5)),
            "rng": ObjectEntry(("rng",), "fractions.Fraction", "obj", 0, 10, (0,)),
            "stale": ValueEntry(("stale",), encode_plain(1)),
        }
    )

    class Optim:  # a Stateful object whose fresh state lacks the moments
        def state_dict(self):
            return {"state": {}}

        def load_state_dict(self, sd):
            pass

    w = torch.zeros(4, 4)
    flat = flatten({"w": w, "new": None, "step": 0, "rng": None, "opt": Optim(), "gone": 1})
    keys = match_keys(flat, meta)
    assert keys.missing == ["gone"] and keys.unexpected == ["stale"]
    assert keys.adopt == ["opt.state.0.m"]
    plan = plan_reads(flat, meta, keys.adopt)
    assert [t.key for t in plan.targets] == ["w"] and plan.targets[0].tensor is w
    assert [k for k, _ in plan.fresh] == ["new", "opt.state.0.m"]
    assert [k for k, _ in plan.objects] == ["rng"]
    assert plan.replaced == {"step": 5}
    assert plan.files == {"f0", "f1", "obj"}


def test_read_plan_refuses_wrong_shapes_and_lossy_casts_before_reading():
    meta = _meta({"w": _entry(("w",), (4,), [_chunk((0,), (4,), "f0", 0)])})
    flat = flatten({"w": torch.zeros(5)})
    with pytest.raises(ShapeMismatchError, match="shape"):
        plan_reads(flat, meta, [])
    flat = flatten({"w": torch.zeros(4, dtype=torch.float16)})
    with pytest.raises(ShapeMismatchError, match="allow_lossy_cast"):
        plan_reads(flat, meta, [])
    assert plan_reads(flat, meta, [], allow_lossy_cast=True).targets


def test_read_groups_coalesce_only_back_to_back_chunks_of_one_file():
    chunks = [
        _chunk((0,), (4,), "f0", 0),
        _chunk((4,), (4,), "f0", 16),  # right after the first
        _chunk((8,), (4,), "f0", 64),  # a gap
        _chunk((12,), (4,), "f1", 80),  # another file
    ]
    meta = _meta({"w": _entry(("w",), (16,), chunks)})
    plan = plan_reads(flatten({"w": torch.zeros(16)}), meta, [])
    assert [len(g) for g in read_groups(plan.targets, coalesce=True)] == [2, 1, 1]
    # small chunks are read together on every store; large ones each on its own
    assert [len(g) for g in read_groups(plan.targets, coalesce=False)] == [2, 1, 1]
    big = SMALL_CHUNK_BYTES // 4 + 1  # float32 elements: just over the small-chunk size
    chunks = [_chunk((0,), (4,), "f0", 0), _chunk((4,), (big,), "f0", 16)]
    chunks.append(_chunk((4 + big,), (4,), "f0", 16 + 4 * big))
    meta = _meta({"w": _entry(("w",), (8 + big,), chunks)})
    plan = plan_reads(flatten({"w": torch.zeros(8 + big)}), meta, [])
    assert [len(g) for g in read_groups(plan.targets, coalesce=False)] == [1, 1, 1]
    assert [len(g) for g in read_groups(plan.targets, coalesce=True)] == [3]


def test_overlap_of_boxes():
    assert overlap((0, 0), (4, 4), (2, 1), (4, 2)) == ((2, 1), (2, 2))
    assert overlap((0,), (4,), (4,), (4,)) is None


def test_read_jobs_take_the_files_in_turn_each_front_to_back():
    from async_ckpt.pipeline.read_jobs import read_jobs

    groups = [
        [(None, _chunk((i,), (1 << 18,), name, i << 20))] for name in ("a", "b") for i in range(4)
    ]
    jobs = read_jobs(groups, threads=1)  # 1 MiB per group, 2 MiB per job: two jobs per file
    files = [[c.file for g in job for _, c in g] for job in jobs]
    assert files == [["a", "a"], ["b", "b"], ["a", "a"], ["b", "b"]]
    offsets = [c.offset for job in jobs for g in job for _, c in g if c.file == "a"]
    assert offsets == sorted(offsets)
    assert sum(len(job) for job in jobs) == len(groups)
