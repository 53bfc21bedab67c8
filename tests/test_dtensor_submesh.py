"""DTensors on a mesh that leaves some ranks out: those ranks hold no piece of them.

A rank outside a DTensor's mesh contributes no chunk and no bytes for it, yet
still knows the key (and its global shape and dtype), so key validation agrees
across ranks and the committed chunks cover the tensor exactly.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_ranks

import async_ckpt as ac
from async_ckpt.format.decode import decode_metadata
from async_ckpt.storage.detect import detect_reader

pytestmark = pytest.mark.multiprocess

_GEN = torch.Generator().manual_seed(13)
SUB = torch.randn(6, 4, generator=_GEN)  # on a sub-mesh holding one rank only
SHARDED = torch.randn(8, 3, generator=_GEN).to(torch.bfloat16)  # sharded over both ranks
PLAIN = torch.arange(5, dtype=torch.int64)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    )


def _state(rank: int, holder: int, how: str, zeros: bool) -> dict:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    sub_mesh = DeviceMesh("cpu", [holder])  # created on every rank; the other is outside it
    world_mesh = init_device_mesh("cpu", (2,))
    sub = torch.zeros_like(SUB) if zeros else SUB.clone()
    if how == "distribute":
        sub_t = distribute_tensor(sub, sub_mesh, [Shard(0)])
    else:  # from_local: outside the mesh the global shape must be given
        local = sub if rank == holder else torch.empty(0)
        sub_t = DTensor.from_local(
            local, sub_mesh, [Replicate()], run_check=False, shape=SUB.shape, stride=SUB.stride()
        )
    sharded = torch.zeros_like(SHARDED) if zeros else SHARDED.clone()
    return {
        "sub": sub_t,
        "sharded": distribute_tensor(sharded, world_mesh, [Shard(0)]),
        "plain": torch.zeros_like(PLAIN) if zeros else PLAIN.clone(),
    }


class _CountingReader:
    """A storage reader that counts the data reads it serves."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.reads = 0

    def read_into(self, name: str, offset: int, dest: memoryview) -> None:
        self.reads += 1
        self.inner.read_into(name, offset, dest)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _save_load_body(rank, world_size, root, how, saver, holder):
    sd = _state(rank, holder, how, zeros=False)
    ckpt_id = f"{root}/ckpt"
    if saver == "sync":
        meta = ac.save(sd, checkpoint_id=ckpt_id)
    else:
        with ac.AsyncCheckpointer(executor=saver, group_timeout=30) as ckpt:
            meta = ckpt.save(sd, checkpoint_id=ckpt_id).result(timeout=60)

    # Only the holder stored the sub-mesh tensor, as one chunk covering it (rank 0 writes the
    # metadata, also when it holds no piece); the metadata decodes.
    chunks = meta.entries["sub"].chunks
    assert [(c.offsets, c.sizes) for c in chunks] == [((0, 0), (6, 4))]
    assert all(f"-r{holder}-" in c.file for c in chunks)
    decode_metadata(detect_reader(ckpt_id).read_metadata())
    expected_bytes = SUB.numel() * 4 + SHARDED.numel() * 2 + PLAIN.numel() * 8
    assert sum(meta.files.values()) == expected_bytes, "nothing extra, nothing twice"

    # Loading only the sub-mesh tensor: the rank outside the mesh reads nothing at all.
    target = {"sub": _state(rank, holder, how, zeros=True)["sub"]}
    reader = _CountingReader(detect_reader(ckpt_id))
    ac.load(target, storage_reader=reader, strict=False)
    if rank == holder:
        assert reader.reads > 0
        assert _bits_equal(target["sub"].to_local(), SUB)
    else:
        assert reader.reads == 0
        assert target["sub"].to_local().numel() == 0

    # The whole state, strictly: both meshes and the plain tensor.
    target = _state(rank, holder, how, zeros=True)
    ac.load(target, checkpoint_id=ckpt_id)
    if rank == holder:
        assert _bits_equal(target["sub"].to_local(), SUB)
    assert _bits_equal(target["sharded"].full_tensor(), SHARDED)
    assert _bits_equal(target["plain"], PLAIN)

    # A save of this rank alone cannot hold the tensor when the rank is outside its mesh.
    if rank != holder:
        with pytest.raises(ac.StateDictError, match="no piece"):
            ac.save({"sub": sd["sub"]}, checkpoint_id=f"{root}/alone", no_dist=True)
    return True


@pytest.mark.parametrize(
    ("how", "saver", "holder"),
    [
        ("distribute", "process", 0),
        ("from_local", "sync", 0),
        ("distribute", "thread", 1),  # rank 0, which writes the metadata, holds no piece
        ("from_local", "process", 1),
    ],
)
def test_dtensor_on_a_sub_mesh_saves_and_loads(tmp_path, how, saver, holder):
    results = run_ranks(_save_load_body, 2, str(tmp_path), how, saver, holder, timeout=90)
    assert results == [True, True]
    # a plain tensor in one process loads the whole of it
    target = {"sub": torch.zeros(6, 4), "sharded": torch.zeros(8, 3, dtype=torch.bfloat16)}
    ac.load(target, checkpoint_id=f"{tmp_path}/ckpt", strict=False, no_dist=True)
    assert _bits_equal(target["sub"], SUB)
    assert _bits_equal(target["sharded"], SHARDED)
    assert not (tmp_path / "alone" / "metadata.json").exists()
