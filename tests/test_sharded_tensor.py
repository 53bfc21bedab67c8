"""ShardedTensor (FSDP1's SHARDED_STATE_DICT): saved as the pieces of a global tensor.

Each local shard is one chunk, placed by its metadata; a rank may hold none,
one or several shards. Loads fill a ShardedTensor's local shards in place and
reshard freely: a saved ShardedTensor loads into DTensors, plain tensors and a
ShardedTensor of another sharding, and a saved DTensor into a ShardedTensor.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from dist_utils import run_ranks
from helpers import tensor_bytes

import async_ckpt as ac
from async_ckpt.state.flatten import flatten
from async_ckpt.state.leaves import LeafKind, leaf_kind

pytestmark = pytest.mark.multiprocess

_GEN = torch.Generator().manual_seed(7)
EVEN = torch.randn(6, 4, generator=_GEN)  # ChunkShardingSpec on dim 0: 3 rows a rank
UNEVEN = torch.randn(7, 3, generator=_GEN).to(torch.bfloat16)  # 4 rows and 3
MULTI = torch.arange(5 * 3, dtype=torch.int32).reshape(5, 3)  # rank 0: two shards, rank 1: one
SOLO = torch.randn(4, 2, generator=_GEN).to(torch.float64)  # rank 0: two shards, rank 1: none
PLAIN = torch.arange(5, dtype=torch.int64)

# (offsets, sizes) of each rank's shards in the hand-made layouts
MULTI_LAYOUT = {0: [((0, 0), (1, 3)), ((3, 0), (2, 3))], 1: [((1, 0), (2, 3))]}
SOLO_LAYOUT = {0: [((0, 0), (3, 2)), ((3, 0), (1, 2))], 1: []}
UNEVEN_LAYOUT = {0: [((0, 0), (2, 3)), ((5, 0), (2, 3))], 1: [((2, 0), (3, 3))]}
SOLO_HALVES = {0: [((0, 0), (2, 2))], 1: [((2, 0), (2, 2))]}


def _same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return (
        actual.dtype == expected.dtype
        and tuple(actual.shape) == tuple(expected.shape)
        and tensor_bytes(actual) == tensor_bytes(expected)
    )


def _region(full: torch.Tensor, offsets, sizes) -> torch.Tensor:
    return full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]


def _chunked(full: torch.Tensor, dim: int, world_size: int, zeros: bool):
    """A ShardedTensor of ``full`` split along ``dim`` over every rank (ChunkShardingSpec)."""
    from torch.distributed._shard import sharded_tensor
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    spec = ChunkShardingSpec(dim=dim, placements=[f"rank:{r}/cpu" for r in range(world_size)])
    st = sharded_tensor.zeros(spec, *full.shape, dtype=full.dtype)
    if not zeros:
        for shard in st.local_shards():
            md = shard.metadata
            shard.tensor.copy_(_region(full, md.shard_offsets, md.shard_sizes))
    return st


def _laid_out(full: torch.Tensor, layout: dict, rank: int, zeros: bool, device: str = "cpu"):
    """A ShardedTensor of ``full`` with this rank's shards as ``layout`` lists them."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    shards = []
    for offsets, sizes in layout[rank]:
        data = _region(full, offsets, sizes).clone()
        if zeros:
            data = torch.zeros_like(data, device=device)
        placement = f"rank:{rank}/{device}"
        shards.append(Shard(data, ShardMetadata(list(offsets), list(sizes), placement)))
    return init_from_local_shards(shards, *full.shape)


def _state(rank: int, world_size: int, zeros: bool) -> dict:
    return {
        "model": {
            "even": _chunked(EVEN, 0, world_size, zeros),
            "uneven": _chunked(UNEVEN, 0, world_size, zeros),
            "multi": _laid_out(MULTI, MULTI_LAYOUT, rank, zeros),
        },
        "solo": _laid_out(SOLO, SOLO_LAYOUT, rank, zeros),
        "plain": torch.zeros_like(PLAIN) if zeros else PLAIN.clone(),
    }


FULLS = {"model.even": EVEN, "model.uneven": UNEVEN, "model.multi": MULTI, "solo": SOLO}


def _check_shards(st, full: torch.Tensor) -> None:
    """Every local shard of ``st`` holds its region of ``full``, bit for bit."""
    for shard in st.local_shards():
        md = shard.metadata
        assert _same_bits(shard.tensor, _region(full, md.shard_offsets, md.shard_sizes))


def _dtensors(world_size: int, dim: int, zeros: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for key, full in FULLS.items():
        data = torch.zeros_like(full) if zeros else full.clone()
        out[key] = distribute_tensor(data, mesh, [Shard(dim)])
    return out


def _save_load_body(rank, world_size, root, saver):
    sd = _state(rank, world_size, zeros=False)
    ckpt_id = f"{root}/st"
    # Only metadata() and local_shards() are read: nothing goes through ShardedTensor's
    # deprecated op table (its properties warn).
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        if saver == "sync":
            meta = ac.save(sd, checkpoint_id=ckpt_id)
        else:
            with ac.AsyncCheckpointer(executor=saver, group_timeout=30) as ckpt:
                meta = ckpt.save(sd, checkpoint_id=ckpt_id).result(timeout=60)

    # One chunk per shard, each stored once, at its offsets; nothing extra.
    chunks = {k: [(c.offsets, c.sizes) for c in meta.entries[k].chunks] for k in FULLS}
    assert chunks["model.even"] == [((0, 0), (3, 4)), ((3, 0), (3, 4))]
    assert chunks["model.uneven"] == [((0, 0), (4, 3)), ((4, 0), (3, 3))]
    assert chunks["model.multi"] == sorted(MULTI_LAYOUT[0] + MULTI_LAYOUT[1])
    assert chunks["solo"] == SOLO_LAYOUT[0]
    for key, full in FULLS.items():
        entry = meta.entries[key]
        assert entry.shape == tuple(full.shape) and entry.dtype == str(full.dtype)[6:]
    expected = sum(t.numel() * t.element_size() for t in (*FULLS.values(), PLAIN))
    assert sum(meta.files.values()) == expected

    # In place, into ShardedTensors of the same layout (the solo tensor: nothing on rank 1).
    target = _state(rank, world_size, zeros=True)
    solo_shards = [s.tensor for s in target["solo"].local_shards()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ac.load(target, checkpoint_id=ckpt_id)
    for key, full in FULLS.items():
        node = target["solo"] if key == "solo" else target["model"][key.split(".")[1]]
        _check_shards(node, full)
    assert [s.tensor for s in target["solo"].local_shards()] == solo_shards  # same tensors
    assert _same_bits(target["plain"], PLAIN)

    # Resharded: into DTensors sharded on either dimension ...
    for dim in (0, 1):
        dts = _dtensors(world_size, dim, zeros=True)
        ac.load(dts, checkpoint_id=ckpt_id, strict=False)
        for key, full in FULLS.items():
            assert _same_bits(dts[key].full_tensor(), full), (key, dim)
    # ... and into ShardedTensors split the other way, or laid out by hand.
    other = {
        "model": {
            "even": _chunked(EVEN, 1, world_size, zeros=True),
            "uneven": _laid_out(UNEVEN, UNEVEN_LAYOUT, rank, zeros=True),
            "multi": _chunked(MULTI, 1, world_size, zeros=True),
        },
        "solo": _chunked(SOLO, 0, world_size, zeros=True),
    }
    ac.load(other, checkpoint_id=ckpt_id, strict=False)
    _check_shards(other["model"]["even"], EVEN)
    _check_shards(other["model"]["uneven"], UNEVEN)
    _check_shards(other["model"]["multi"], MULTI)
    _check_shards(other["solo"], SOLO)
    return True


@pytest.mark.parametrize("saver", ["sync", "process"])
def test_sharded_tensors_save_and_load_in_place_and_resharded(tmp_path, saver):
    assert run_ranks(_save_load_body, 2, str(tmp_path), saver, timeout=120) == [True, True]
    # One process loads the whole of each into plain tensors.
    target = {"model": {k.split(".")[1]: torch.zeros_like(v) for k, v in FULLS.items() if "." in k}}
    target["solo"] = torch.zeros_like(SOLO)
    ac.load(target, checkpoint_id=f"{tmp_path}/st", strict=False, no_dist=True)
    for key, full in FULLS.items():
        node = target["solo"] if key == "solo" else target["model"][key.split(".")[1]]
        assert _same_bits(node, full), key


def _from_dtensor_body(rank, world_size, root):
    ckpt_id = f"{root}/dt"
    ac.save(
        {**_dtensors(world_size, 1, zeros=False), "plain": PLAIN.clone()}, checkpoint_id=ckpt_id
    )
    target = _state(rank, world_size, zeros=True)
    ac.load(target, checkpoint_id=ckpt_id)
    for key, full in FULLS.items():
        node = target["solo"] if key == "solo" else target["model"][key.split(".")[1]]
        _check_shards(node, full)

    # A ShardedTensor whose shards are on the meta device is refused, as DCP refuses it:
    # it is not rebuilt from the checkpoint.
    meta_target = {"solo": _laid_out(SOLO, SOLO_HALVES, rank, zeros=True, device="meta")}
    with pytest.raises(ac.StateDictError, match="'solo'.*meta device"):
        ac.load(meta_target, checkpoint_id=ckpt_id, strict=False)
    # ... and so is saving one
    with pytest.raises(ac.StateDictError, match="'solo'.*meta device"):
        ac.save(meta_target, checkpoint_id=f"{root}/never")
    return True


def test_a_saved_dtensor_loads_into_sharded_tensors(tmp_path):
    assert run_ranks(_from_dtensor_body, 2, str(tmp_path), timeout=120) == [True, True]
    assert not (tmp_path / "never").exists()


def _leaf_body(rank, world_size):
    st = _chunked(EVEN, 0, world_size, zeros=False)
    flat = flatten({"a": {"st": st}})
    assert list(flat.leaves) == ["a.st"] and flat.leaves["a.st"] is st  # a leaf, not walked
    assert leaf_kind(st) is LeafKind.SHARDED and LeafKind.SHARDED.has_bytes
    return True


def test_a_sharded_tensor_is_one_leaf(tmp_path):
    assert run_ranks(_leaf_body, 2, timeout=60) == [True, True]
