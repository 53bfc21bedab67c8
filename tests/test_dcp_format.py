"""Checkpoints written by torch.distributed.checkpoint (DCP), loaded directly and safely.

DCP writes them here (``torch_dcp.save``); async_ckpt loads them into the same
layout, into other layouts and world sizes, and without a template
(``materialize``), bit for bit. A hostile ``.metadata`` or byte entry is
refused without running; damaged data files are CorruptCheckpointError.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from dist_utils import run_ranks
from helpers import DTYPES, assert_same_tensor, random_tensor, tensor_bytes

import async_ckpt
import async_ckpt.storage.dcp as dcp_storage
from async_ckpt.cli import main
from async_ckpt.errors import CorruptCheckpointError, MetadataError, UnsafeObjectError
from async_ckpt.format.dcp import decode_dcp_metadata
from async_ckpt.materialize import materialize
from async_ckpt.storage import FileSystemReader, detect_reader
from async_ckpt.storage.dcp import DcpReader


def _dcp_save(state: dict[str, Any], path: Path, **kwargs: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns about no_dist and its own deprecations
        torch_dcp.save(state, checkpoint_id=path, no_dist=True, **kwargs)


def _assert_same(actual: Any, expected: Any) -> None:
    """Same nested structure (container types included), tensors bit for bit."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (actual, expected)
        for key in expected:
            _assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_same(a, e)
    elif isinstance(expected, torch.Tensor):
        assert_same_tensor(actual, expected)
    else:
        assert type(actual) is type(expected) and actual == expected


def _model_and_optim(seed: int, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed + 1))
    for _ in range(steps):
        model(torch.randn(3, 8)).sum().backward()
        optim.step()
    return model, optim


def _mixed_state(seed: int) -> dict[str, Any]:
    """Tensors of every dtype and layout DCP writes, nested containers, plain values."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "dtypes": {str(d): random_tensor(d, (5, 3), seed=seed + n) for n, d in enumerate(DTYPES)},
        "scalar": torch.tensor(seed + 0.5),
        "empty": torch.empty(0, 3),
        "channels_last": torch.randn(2, 3, 4, 4, generator=gen).to(
            memory_format=torch.channels_last
        ),
        "transposed": torch.randn(6, 4, generator=gen).t(),
        "nested": {"a": [torch.randn(3, generator=gen), {"b": seed, "c": [1.5, "x"]}]},
        "step": seed * 10,
        "lr": 0.25 * seed,
        "name": f"run-{seed}",
        "flags": [True, None, b"raw"],
        "pair": (seed, torch.arange(3) + seed),
    }


# ------------------------------------------------------------------- single-process saves


def test_detects_a_dcp_directory_and_leaves_ours_alone(tmp_path: Path) -> None:
    _dcp_save({"w": torch.ones(2)}, tmp_path / "dcp")
    assert type(detect_reader(tmp_path / "dcp")) is DcpReader
    async_ckpt.save({"w": torch.ones(2)}, checkpoint_id=tmp_path / "ours")
    assert type(detect_reader(tmp_path / "ours")) is FileSystemReader
    (tmp_path / "ours" / ".metadata").write_bytes(b"")  # ours wins when both are there
    assert type(detect_reader(tmp_path / "ours")) is FileSystemReader


def test_load_into_the_same_layout_is_bit_exact(tmp_path: Path) -> None:
    model, optim = _model_and_optim(seed=1, steps=2)
    saved = {"model": model.state_dict(), "optim": optim.state_dict(), **_mixed_state(1)}
    _dcp_save(saved, tmp_path / "dcp")

    model2, optim2 = _model_and_optim(seed=2, steps=1)  # other values, same keys
    target = {"model": model2.state_dict(), "optim": optim2.state_dict(), **_mixed_state(2)}
    async_ckpt.load(target, checkpoint_id=tmp_path / "dcp")
    optim2.load_state_dict(target["optim"])
    expected = {"model": model.state_dict(), "optim": optim.state_dict(), **_mixed_state(1)}
    expected["transposed"] = expected["transposed"].contiguous()
    target["transposed"] = target["transposed"].contiguous()
    _assert_same(target, expected)
    _assert_same(optim2.state_dict(), optim.state_dict())
    _assert_same(model2.state_dict(), model.state_dict())


def test_a_fresh_optimizer_adopts_the_saved_state_under_integer_ids(tmp_path: Path) -> None:
    model, optim = _model_and_optim(seed=3, steps=2)
    _dcp_save({"model": model.state_dict(), "optim": optim.state_dict()}, tmp_path / "dcp")
    model2, optim2 = _model_and_optim(seed=4, steps=0)  # no optimizer state yet
    async_ckpt.load({"model": model2, "optim": optim2}, checkpoint_id=tmp_path / "dcp")
    # DCP stored the parameter ids as strings; a torch optimizer needs them back as ints
    _assert_same(optim2.state_dict(), optim.state_dict())
    _assert_same(model2.state_dict(), model.state_dict())


def test_materialize_rebuilds_the_nested_state(tmp_path: Path) -> None:
    model, optim = _model_and_optim(seed=5, steps=1)
    saved = {"model": model.state_dict(), "optim": optim.state_dict(), **_mixed_state(5)}
    _dcp_save(saved, tmp_path / "dcp")
    expected = {"model": model.state_dict(), "optim": optim.state_dict(), **_mixed_state(5)}
    expected["transposed"] = expected["transposed"].contiguous()
    _assert_same(materialize(tmp_path / "dcp"), expected)


def test_safetensors_serialization_is_read_in_place(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    state = {"a": random_tensor(torch.bfloat16, (64, 8)), "n": {"i": torch.arange(5)}, "s": 4}
    writer = FileSystemWriter(
        tmp_path / "dcp", serialization_format=SerializationFormat.SAFETENSORS
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_dcp.save(state, storage_writer=writer, no_dist=True)
    _assert_same(materialize(tmp_path / "dcp"), state)
    # a row range of a chunk is read from the data file where it lies, nothing decoded
    reader = DcpReader(tmp_path / "dcp")
    chunk = reader.translated_metadata().entries["a"].chunks[0]
    assert chunk.file == "__0_0.distcp"
    rows = bytearray(8 * 8 * 2)
    reader.read_into(chunk.file, chunk.offset + 16 * 8 * 2, memoryview(rows))
    assert bytes(rows) == tensor_bytes(state["a"][16:24])
    reader.close()


def test_a_reshard_decodes_each_blob_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = random_tensor(torch.float32, (64, 8))
    _dcp_save({"w": full}, tmp_path / "dcp")
    decodes = []
    real = dcp_storage.decode_tensor_blob

    def counting(*args: Any) -> torch.Tensor:
        decodes.append(args[-1])
        return real(*args)

    monkeypatch.setattr(dcp_storage, "decode_tensor_blob", counting)
    reader = DcpReader(tmp_path / "dcp")
    chunk = reader.translated_metadata().entries["w"].chunks[0]
    row = 8 * 4
    for first in range(0, 64, 16):  # what a load into four row shards reads
        buf = bytearray(16 * row)
        reader.read_into(chunk.file, chunk.offset + first * row, memoryview(buf))
        assert bytes(buf) == tensor_bytes(full[first : first + 16])
    assert len(decodes) == 1
    with pytest.raises(CorruptCheckpointError, match="outside"):
        reader.read_into(chunk.file, 64 * row - 4, memoryview(bytearray(8)))
    reader.close()


def test_fsspec_urls_are_read_through_an_explicit_reader(memory_url: str) -> None:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    state = {"w": random_tensor(torch.float16, (4, 4)), "v": [1, 2]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_dcp.save(state, storage_writer=FsspecWriter(memory_url), no_dist=True)
    target = {"w": torch.zeros(4, 4, dtype=torch.float16), "v": [0, 0]}
    async_ckpt.load(target, storage_reader=DcpReader(memory_url))
    _assert_same(target, state)


# -------------------------------------------------------------------------- multi-rank saves

FULL_SHAPE = (12, 6)


def _full(name: str) -> torch.Tensor:
    return random_tensor(torch.float32, FULL_SHAPE, seed=sum(map(ord, name)))


def _dtensor_state(placements: dict[str, Any], fill: bool) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    state: dict[str, Any] = {}
    for name, place in placements.items():
        source = _full(name) if fill else torch.zeros(FULL_SHAPE)
        state[name] = distribute_tensor(source, mesh, [place])
    return {"layers": [state], "step": 3 if fill else 0}


def _dcp_ranks_body(rank: int, world_size: int, root: str) -> bool:
    from torch.distributed.tensor import Replicate, Shard

    saved = {"w": Shard(0), "c": Shard(1), "r": Replicate()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_dcp.save(_dtensor_state(saved, fill=True), checkpoint_id=root)
    for layout in (saved, {"w": Shard(1), "c": Shard(0), "r": Shard(0)}):
        target = _dtensor_state(layout, fill=False)
        async_ckpt.load(target, checkpoint_id=root)
        assert target["step"] == 3
        for name, tensor in target["layers"][0].items():
            assert_same_tensor(tensor.full_tensor(), _full(name))
    return True


@pytest.mark.multiprocess
def test_two_rank_dtensor_checkpoint_loads_in_any_layout(tmp_path: Path) -> None:
    root = tmp_path / "dcp"
    assert run_ranks(_dcp_ranks_body, 2, str(root)) == [True, True]
    # another world size: one process, plain tensors, from both ranks' files
    target = {"layers": [{n: torch.zeros(FULL_SHAPE) for n in "wcr"}], "step": 0}
    async_ckpt.load(target, checkpoint_id=root)
    expected = {"layers": [{n: _full(n) for n in "wcr"}], "step": 3}
    _assert_same(target, expected)
    _assert_same(materialize(root), expected)
    assert DcpReader(root).translated_metadata().world_size == 2


def _dcp_one_process_reshard_body(rank: int, world_size: int, root: str) -> bool:
    from torch.distributed.tensor import Shard

    target = _dtensor_state({"w": Shard(0), "c": Shard(1)}, fill=False)
    async_ckpt.load(target, checkpoint_id=root)  # row ranges, and columns, of one chunk each
    for name, tensor in target["layers"][0].items():
        assert_same_tensor(tensor.full_tensor(), _full(name))
    return True


@pytest.mark.multiprocess
def test_one_process_checkpoint_reshards_onto_two_ranks(tmp_path: Path) -> None:
    root = tmp_path / "dcp"
    _dcp_save({"layers": [{"w": _full("w"), "c": _full("c")}], "step": 3}, root)
    assert run_ranks(_dcp_one_process_reshard_body, 2, str(root)) == [True, True]


# ---------------------------------------------------------------------------------- safety


class _Evil:
    """Unpickling it runs a shell command: the side effect the tests check is absent."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


class _Sneaky:
    pass


@dataclass
class Point:
    x: int
    y: float


def _rewrite_metadata(path: Path, change: Any) -> None:
    """Edit a DCP .metadata the test itself wrote (plain pickle is fine on our own file)."""
    meta = pickle.loads((path / ".metadata").read_bytes())
    change(meta)
    (path / ".metadata").write_bytes(pickle.dumps(meta))


def _small_dcp(path: Path) -> dict[str, Any]:
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 1}
    _dcp_save(state, path)
    return {"w": torch.zeros(2, 3), "step": 0}


@pytest.mark.parametrize("where", ["top", "planner_data", "storage_meta"])
def test_hostile_metadata_is_refused_without_running(tmp_path: Path, where: str) -> None:
    path, marker = tmp_path / "dcp", tmp_path / "pwned"
    target = _small_dcp(path)
    if where == "top":
        (path / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    elif where == "planner_data":
        _rewrite_metadata(path, lambda m: setattr(m, "planner_data", {"w": _Evil(marker)}))
    else:
        _rewrite_metadata(path, lambda m: setattr(m.storage_meta, "modules", [_Evil(marker)]))
    with pytest.raises(UnsafeObjectError, match=r"refusing global (posix|nt|os)\.system"):
        async_ckpt.load(target, checkpoint_id=path)
    assert not marker.exists()


def test_a_class_dcp_metadata_has_no_use_for_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "dcp"
    target = _small_dcp(path)
    _rewrite_metadata(path, lambda m: setattr(m, "planner_data", {"w": _Sneaky()}))
    with pytest.raises(UnsafeObjectError, match=r"_Sneaky"):
        async_ckpt.load(target, checkpoint_id=path)
    with pytest.raises(UnsafeObjectError, match=r"builtins\.eval"):
        decode_dcp_metadata(b"cbuiltins\neval\n(S'1+1'\ntR.")


def test_malformed_metadata_is_a_metadata_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dcp"
    target = _small_dcp(path)

    def escape(meta: Any) -> None:
        for info in meta.storage_data.values():
            info.relative_path = "../../etc/passwd"

    _rewrite_metadata(path, escape)
    with pytest.raises(MetadataError, match="not a plain file name"):
        async_ckpt.load(target, checkpoint_id=path)
    for data in (b"", b"not a pickle", pickle.dumps({"a": 1})[:-3], pickle.dumps([1, 2])):
        with pytest.raises(MetadataError):
            decode_dcp_metadata(data)
    monkeypatch.setattr(dcp_storage, "MAX_DCP_METADATA_BYTES", 64)  # the read is bounded
    with pytest.raises(MetadataError, match="limit"):
        DcpReader(path).read_metadata()


def test_stream_transforms_are_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "dcp"
    target = _small_dcp(path)

    def compress(meta: Any) -> None:
        for info in meta.storage_data.values():
            info.transform_descriptors = ["zstd/1"]

    _rewrite_metadata(path, compress)
    with pytest.raises(MetadataError, match=r"stream transforms \['zstd/1'\]"):
        async_ckpt.load(target, checkpoint_id=path)


def test_a_hostile_byte_entry_is_refused_only_when_loaded(tmp_path: Path) -> None:
    path, marker = tmp_path / "dcp", tmp_path / "pwned"
    _dcp_save({"w": torch.ones(3), "evil": _Evil(marker)}, path)
    with pytest.raises(UnsafeObjectError, match=r"(posix|nt|os)\.system"):
        async_ckpt.load({"w": torch.zeros(3), "evil": None}, checkpoint_id=path)
    target = {"w": torch.zeros(3)}  # the other keys still load
    async_ckpt.load(target, checkpoint_id=path)
    assert_same_tensor(target["w"], torch.ones(3))
    assert not marker.exists()


def test_an_allow_listed_class_loads_from_a_byte_entry(tmp_path: Path) -> None:
    path = tmp_path / "dcp"
    _dcp_save({"p": Point(1, 2.5)}, path)
    with pytest.raises(UnsafeObjectError, match=r"Point"):
        async_ckpt.load({"p": None}, checkpoint_id=path)
    async_ckpt.allow_class(Point)
    target: dict[str, Any] = {"p": None}
    async_ckpt.load(target, checkpoint_id=path)
    assert target["p"] == Point(1, 2.5)


def test_a_truncated_data_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "dcp"
    target = _small_dcp(path)
    data = path / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])  # the last tensor's blob loses its end
    with pytest.raises(CorruptCheckpointError):
        async_ckpt.load(target, checkpoint_id=path)


def test_a_damaged_blob_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "dcp"
    target = _small_dcp(path)
    blob = DcpReader(path).translated_metadata().entries["w"].chunks[0].file
    offset = int(blob.split("-")[1].split(".")[0])
    with open(path / "__0_0.distcp", "r+b") as f:  # the blob's zip framing
        f.seek(offset)
        f.write(b"XXXX")
    with pytest.raises(CorruptCheckpointError, match="cannot be decoded"):
        async_ckpt.load(target, checkpoint_id=path)


# -------------------------------------------------------------------------------------- CLI


def test_cli_inspects_and_verifies_a_dcp_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "dcp"
    _small_dcp(path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.checkpoint" in out and "float32" in out
    assert main(["verify", "-q", str(path)]) == 0
    assert "no checksums" in capsys.readouterr().out
    data = path / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])
    assert main(["verify", "-q", str(path)]) == 1
    assert "truncated" in capsys.readouterr().err
