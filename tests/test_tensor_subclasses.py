"""Tensor subclasses and devices: what is saved, what is refused at the call, meta targets.

* A subclass that only adds Python methods is saved and loaded as a plain tensor.
* Tensors whose bytes cannot be stored (``__torch_dispatch__`` wrappers, FakeTensor,
  nested, quantized, sparse) raise StateDictError naming the key and the type, from
  both ``save`` and ``async_save`` before anything runs, and as load targets.
* DTensors whose local tensor is a ``LocalShardsWrapper`` (TorchRec's uneven and
  several-shards-per-rank layouts), uneven Shard(0) DTensors and empty shards.
* Meta-device load targets are replaced by real tensors holding the loaded data, as
  DCP does (``model.load_state_dict(sd, assign=True)`` takes them).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from dist_utils import run_ranks
from helpers import tensor_bytes
from torch.utils._pytree import tree_map

import async_ckpt as ac
from async_ckpt.state.flatten import flatten
from async_ckpt.state.leaves import LeafKind, leaf_kind


def _same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return (
        actual.dtype == expected.dtype
        and tuple(actual.shape) == tuple(expected.shape)
        and tensor_bytes(actual) == tensor_bytes(expected)
    )


class Tagged(torch.Tensor):
    """A subclass that only adds a Python method: its bytes are its own."""

    def tag(self) -> str:
        return "tagged"


class Boxed(torch.Tensor):
    """A toy ``__torch_dispatch__`` wrapper (as fp8 and quantization subclasses are): every
    op runs on the tensor it wraps, so it computes, but its bytes are not its own."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, dtype=inner.dtype, device=inner.device
        )

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(x):
            return x.inner if isinstance(x, Boxed) else x

        def wrap(x):
            return Boxed(x) if isinstance(x, torch.Tensor) else x

        return tree_map(wrap, func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {})))


def _fake() -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.ones(3)


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():  # quantized tensors are deprecated (warned once)
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)


UNSTORABLE = {
    "dispatch wrapper": (lambda: Boxed(torch.ones(3)), r"Boxed.*__torch_dispatch__"),
    "fake tensor": (_fake, r"FakeTensor.*__torch_dispatch__"),
    "jagged nested": (
        lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged),
        r"NestedTensor.*__torch_dispatch__",
    ),
    "strided nested": (
        lambda: torch.nested.as_nested_tensor([torch.ones(2), torch.ones(3)]),
        "nested tensor",
    ),
    "quantized": (_quantized, r"quantized tensor \(torch.qint8\)"),
    "sparse": (lambda: torch.eye(3).to_sparse(), "layout torch.sparse_coo"),
    "sparse csr": (lambda: torch.eye(3).to_sparse_csr(), "layout torch.sparse_csr"),
}


@pytest.mark.parametrize("case", list(UNSTORABLE.values()), ids=list(UNSTORABLE))
def test_unstorable_tensors_are_refused_at_the_save_call(tmp_path, case):
    make, why = case
    state = {"ok": torch.ones(2), "model": {"bad": make()}}
    path = tmp_path / "ckpt"
    match = rf"cannot save tensor 'model\.bad': .*{why}"
    with pytest.raises(ac.StateDictError, match=match):
        ac.save(state, checkpoint_id=path, no_dist=True)
    with ac.AsyncCheckpointer(executor="thread", no_dist=True) as ckpt:
        with pytest.raises(ac.StateDictError, match=match):  # at the call, not in the future
            ckpt.save(state, checkpoint_id=path)
        ckpt.save({"ok": torch.ones(2)}, checkpoint_id=tmp_path / "good").result(timeout=60)
    with pytest.raises(ac.StateDictError, match=match):
        ac.async_save(state, checkpoint_id=path, no_dist=True, executor="thread")
    assert not path.exists()  # refused before the storage was touched


@pytest.mark.parametrize("case", list(UNSTORABLE.values()), ids=list(UNSTORABLE))
def test_unstorable_tensors_are_refused_as_load_targets(tmp_path, case):
    make, why = case
    path = tmp_path / "ckpt"
    ac.save({"model": {"bad": torch.ones(3)}}, checkpoint_id=path, no_dist=True)
    with pytest.raises(ac.StateDictError, match=rf"cannot load into tensor 'model\.bad': .*{why}"):
        ac.load({"model": {"bad": make()}}, checkpoint_id=path)


def test_a_subclass_adding_only_methods_is_saved_as_a_plain_tensor(tmp_path):
    data = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    tagged = data.clone().as_subclass(Tagged)
    assert leaf_kind(tagged) is LeafKind.TENSOR
    path = tmp_path / "ckpt"
    ac.save({"t": tagged}, checkpoint_id=path, no_dist=True)
    with ac.AsyncCheckpointer(executor="process", no_dist=True) as ckpt:
        ckpt.save({"t": tagged}, checkpoint_id=tmp_path / "async").result(timeout=60)
    for where in (path, tmp_path / "async"):
        plain = {"t": torch.zeros(4, 3)}
        ac.load(plain, checkpoint_id=where)
        assert _same_bits(plain["t"], data)
        target = torch.zeros(4, 3).as_subclass(Tagged)
        got = {"t": target}
        ac.load(got, checkpoint_id=where)
        assert got["t"] is target and target.tag() == "tagged"  # filled in place
        assert _same_bits(target.as_subclass(torch.Tensor), data)


# ------------------------------------------------------------------ meta-device targets

DATA = {
    "w": torch.randn(4, 3, generator=torch.Generator().manual_seed(2)),
    "b": torch.arange(3, dtype=torch.float32),
    "steps": torch.arange(6, dtype=torch.int32),
}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt"
    state = {"model": {"w": DATA["w"], "b": DATA["b"]}, "steps": DATA["steps"]}
    state["arr"] = np.arange(4, dtype=np.float32)
    ac.save(state, checkpoint_id=path, no_dist=True)
    return path


@pytest.mark.parametrize("verify_first", [False, True])
def test_meta_targets_are_replaced_by_tensors_holding_the_data(saved, verify_first):
    inner = {"w": torch.empty(4, 3, device="meta"), "b": torch.empty(3, device="meta")}
    # a float64 target keeps its dtype (a lossless cast), as a filled tensor would
    target = {"model": inner, "steps": torch.empty(6, dtype=torch.float64, device="meta")}
    ac.load(target, checkpoint_id=saved, strict=False, verify_first=verify_first)
    assert target["model"] is inner  # containers are filled in place, leaves replaced
    assert _same_bits(inner["w"], DATA["w"]) and _same_bits(inner["b"], DATA["b"])
    assert not inner["w"].is_meta and inner["w"].device.type == "cpu"
    assert _same_bits(target["steps"], DATA["steps"].to(torch.float64))


def test_a_meta_module_loads_through_its_state_dict_with_assign(saved):
    model = torch.nn.Module()
    with torch.device("meta"):
        model.w = torch.nn.Parameter(torch.empty(4, 3))
        model.b = torch.nn.Parameter(torch.empty(3))
    sd = model.state_dict()
    ac.load({"model": sd}, checkpoint_id=saved, strict=False)
    model.load_state_dict(sd, assign=True)
    assert not model.w.is_meta and _same_bits(model.w.detach(), DATA["w"])
    assert _same_bits(model.b.detach(), DATA["b"])


def test_a_meta_target_is_left_alone_when_the_load_is_refused(saved):
    target = {"model": {"w": torch.empty(4, 3, dtype=torch.bfloat16, device="meta")}}
    with pytest.raises(ac.ShapeMismatchError, match="'model.w'.*float32"):  # lossy cast
        ac.load(target, checkpoint_id=saved, strict=False)
    assert target["model"]["w"].is_meta
    target = {"model": {"w": torch.empty(3, 4, device="meta")}}
    with pytest.raises(ac.ShapeMismatchError, match="'model.w' has shape"):
        ac.load(target, checkpoint_id=saved, strict=False)
    assert target["model"]["w"].is_meta
    # a stored array loads back as an array, as into any tensor of another kind
    target = {"arr": torch.empty(4, device="meta")}
    ac.load(target, checkpoint_id=saved, strict=False)
    assert isinstance(target["arr"], np.ndarray) and target["arr"].tolist() == [0, 1, 2, 3]


# ------------------------------------------------ DTensor: shard wrappers, uneven, empty, meta

WIDE = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)  # column blocks of 2
ROWS = torch.randn(5, generator=torch.Generator().manual_seed(3))  # row-wise, 1-d
ALL0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))  # every shard on rank 0
UNEVEN = torch.randn(5, 3, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
TINY = torch.arange(4, dtype=torch.int64).reshape(1, 4)  # Shard(0): rank 1 holds no row

# per rank: the (offsets, sizes) of its shards
WIDE_LAYOUT = {0: [((0, 0), (4, 2)), ((0, 2), (4, 2))], 1: [((0, 4), (4, 2))]}
ROWS_LAYOUT = {0: [((0,), (2,)), ((4,), (1,))], 1: [((2,), (2,))]}
ALL0_LAYOUT = {0: [((0, 0), (4, 1)), ((0, 1), (4, 2))], 1: []}


def _region(full, offsets, sizes):
    return full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]


def _wrapped(full, layout, rank, mesh, zeros):
    """A DTensor of ``full`` whose local tensor is a LocalShardsWrapper of ``layout[rank]``."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

    shards = [_region(full, o, s).clone() for o, s in layout[rank]]
    if zeros:
        shards = [torch.zeros_like(t) for t in shards]
    local = LocalShardsWrapper(shards, [o for o, _ in layout[rank]])
    dim = full.dim() - 1
    return DTensor.from_local(
        local, mesh, [Shard(dim)], run_check=False, shape=full.shape, stride=full.stride()
    )


def _dt_state(rank, mesh, zeros):
    from torch.distributed.tensor import Shard, distribute_tensor

    def dist(full):
        return distribute_tensor(
            torch.zeros_like(full) if zeros else full.clone(), mesh, [Shard(0)]
        )

    return {
        "wide": _wrapped(WIDE, WIDE_LAYOUT, rank, mesh, zeros),
        "rows": _wrapped(ROWS, ROWS_LAYOUT, rank, mesh, zeros),
        "all0": _wrapped(ALL0, ALL0_LAYOUT, rank, mesh, zeros),
        "uneven": dist(UNEVEN),
        "tiny": dist(TINY),
    }


FULLS = {"wide": WIDE, "rows": ROWS, "all0": ALL0, "uneven": UNEVEN, "tiny": TINY}


def _local_bits(dt, full, layout, rank) -> bool:
    """Whether every shard of a wrapper DTensor holds its region of ``full``."""
    shards = dt.to_local().local_shards()
    assert len(shards) == len(layout[rank])
    return all(
        _same_bits(t, _region(full, o, s)) for t, (o, s) in zip(shards, layout[rank], strict=True)
    )


def _dtensor_body(rank, world_size, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    ckpt_id = f"{root}/dt"
    with ac.AsyncCheckpointer(executor="thread", group_timeout=30) as ckpt:
        meta = ckpt.save(_dt_state(rank, mesh, zeros=False), checkpoint_id=ckpt_id).result(60)
    chunks = {k: [(c.offsets, c.sizes) for c in e.chunks] for k, e in meta.entries.items()}
    assert chunks["wide"] == WIDE_LAYOUT[0] + WIDE_LAYOUT[1]
    assert chunks["rows"] == sorted(ROWS_LAYOUT[0] + ROWS_LAYOUT[1])
    assert chunks["all0"] == ALL0_LAYOUT[0]
    assert chunks["uneven"] == [((0, 0), (3, 3)), ((3, 0), (2, 3))]
    assert [c for c in chunks["tiny"] if 0 not in c[1]] == [((0, 0), (1, 4))]
    expected = sum(t.numel() * t.element_size() for t in FULLS.values())
    assert sum(meta.files.values()) == expected, "every element stored once"

    # In place into the same layouts: each shard of the wrapper filled.
    target = _dt_state(rank, mesh, zeros=True)
    ac.load(target, checkpoint_id=ckpt_id)
    assert _local_bits(target["wide"], WIDE, WIDE_LAYOUT, rank)
    assert _local_bits(target["rows"], ROWS, ROWS_LAYOUT, rank)
    assert _local_bits(target["all0"], ALL0, ALL0_LAYOUT, rank)
    assert _same_bits(target["uneven"].full_tensor(), UNEVEN)
    assert _same_bits(target["tiny"].full_tensor(), TINY)

    # Resharded: wrapper-saved tensors into plain DTensors, a replicated one, and back.
    plain = {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) for k, v in FULLS.items()}
    plain["wide"] = distribute_tensor(torch.zeros_like(WIDE), mesh, [Replicate()])
    ac.load(plain, checkpoint_id=ckpt_id)
    for key, full in FULLS.items():
        assert _same_bits(plain[key].full_tensor(), full), key
    ac.save(plain, checkpoint_id=f"{root}/plain")
    target = _dt_state(rank, mesh, zeros=True)
    ac.load(target, checkpoint_id=f"{root}/plain")
    assert _local_bits(target["wide"], WIDE, WIDE_LAYOUT, rank)
    assert _local_bits(target["all0"], ALL0, ALL0_LAYOUT, rank)

    # A DTensor whose local tensor is another wrapper subclass: refused by name.
    boxed = DTensor.from_local(Boxed(torch.ones(2, 3)), mesh, [Shard(0)], run_check=False)
    assert type(boxed._local_tensor) is Boxed
    with pytest.raises(ac.StateDictError, match=r"DTensor 'm\.boxed'.*Boxed"):
        ac.save({"m": {"boxed": boxed}}, checkpoint_id=f"{root}/never")
    with pytest.raises(ac.StateDictError, match=r"DTensor 'wide'.*Boxed"):
        ac.load({"wide": boxed}, checkpoint_id=ckpt_id, strict=False)

    # Meta-device DTensors are replaced by DTensors on the mesh's device, same placements.
    meta_sd = {
        "uneven": distribute_tensor(
            torch.empty(5, 3, dtype=torch.bfloat16, device="meta"), mesh, [Shard(0)]
        ),
        "tiny": distribute_tensor(
            torch.empty(1, 4, dtype=torch.int64, device="meta"), mesh, [Shard(1)]
        ),
    }
    assert meta_sd["uneven"].is_meta
    ac.load(meta_sd, checkpoint_id=ckpt_id, strict=False)
    for key in ("uneven", "tiny"):
        got = meta_sd[key]
        assert isinstance(got, DTensor) and not got.to_local().is_meta, key
        assert got.placements == (Shard(0) if key == "uneven" else Shard(1),)
        assert _same_bits(got.full_tensor(), FULLS[key]), key
    return True


@pytest.mark.multiprocess
def test_dtensor_shard_wrappers_uneven_and_empty_shards_and_meta(tmp_path):
    assert run_ranks(_dtensor_body, 2, str(tmp_path), timeout=120) == [True, True]
    assert not (tmp_path / "never").exists()
    # one process loads the whole of each into plain tensors
    target = {k: torch.zeros_like(v) for k, v in FULLS.items()}
    ac.load(target, checkpoint_id=tmp_path / "dt", no_dist=True)
    for key, full in FULLS.items():
        assert _same_bits(target[key], full), key


def test_a_subclass_is_one_leaf():
    boxed, tagged = Boxed(torch.ones(2)), torch.ones(2).as_subclass(Tagged)
    flat = flatten({"a": boxed, "b": tagged})
    assert flat.leaves == {"a": boxed, "b": tagged}
