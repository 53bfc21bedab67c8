"""Choosing the storage backend from the checkpoint id (ported from DCP's test_auto_detect)."""

from __future__ import annotations

import importlib.util
from unittest.mock import patch

import fsspec
import pytest
import torch

import async_ckpt
from async_ckpt import (
    CheckpointNotFoundError,
    FileSystemReader,
    FileSystemWriter,
    FsspecReader,
    FsspecWriter,
    IncompleteCheckpointError,
    MissingBackendError,
    StorageDetectionError,
)
from async_ckpt.storage import FileSystemRoot, FsspecRoot, detect_reader, detect_root, detect_writer


class TinyModule(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net1 = torch.nn.Linear(8, 16)
        self.net2 = torch.nn.Linear(16, 4)


def _model(seed: int) -> TinyModule:
    torch.manual_seed(seed)
    return TinyModule()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_auto_detect(tmp_path):
    model = _model(0)
    first = tmp_path / "first"
    async_ckpt.save(model.state_dict(), checkpoint_id=first)
    other = _model(1)
    assert not _same_weights(model, other)
    async_ckpt.load(other.state_dict(), checkpoint_id=first)
    assert _same_weights(model, other)

    # With the local backend declining every id, the fsspec backend takes local paths.
    second = tmp_path / "second"
    with (
        patch.object(FileSystemReader, "validate_checkpoint_id", return_value=False) as m1,
        patch.object(FileSystemWriter, "validate_checkpoint_id", return_value=False) as m2,
    ):
        assert type(detect_writer(str(second))) is FsspecWriter
        assert type(detect_reader(str(second))) is FsspecReader
        async_ckpt.save(model.state_dict(), checkpoint_id=second)
        fresh = _model(2)
        async_ckpt.load(fresh.state_dict(), checkpoint_id=second)
    assert m1.called and m2.called
    assert _same_weights(model, fresh)
    assert (second / "metadata.json").is_file()

    with pytest.raises(RuntimeError, match="Cannot detect"):
        async_ckpt.save(model.state_dict(), checkpoint_id="abc://abc.abc")
    with pytest.raises(RuntimeError, match="Cannot detect"):
        async_ckpt.load(model.state_dict(), checkpoint_id="abc://abc.abc")


def test_load_into_the_module_state_dict_fills_the_module(tmp_path):
    model, other = _model(0), _model(1)
    async_ckpt.save(model.state_dict(), checkpoint_id=tmp_path / "c")
    async_ckpt.load(other.state_dict(), checkpoint_id=tmp_path / "c")  # in place
    assert _same_weights(model, other)


def test_detection_picks_the_backend_by_id(tmp_path):
    assert type(detect_writer(tmp_path / "a")) is FileSystemWriter  # os.PathLike
    assert type(detect_writer(str(tmp_path / "a"))) is FileSystemWriter
    assert type(detect_writer(f"file://{tmp_path}/a")) is FileSystemWriter
    assert type(detect_reader("relative/dir")) is FileSystemReader
    assert type(detect_writer("memory://x/y")) is FsspecWriter
    assert type(detect_reader("memory://x/y")) is FsspecReader


def test_detection_picks_the_root_of_a_manager(tmp_path):
    assert type(detect_root(tmp_path)) is FileSystemRoot
    assert type(detect_root(f"file://{tmp_path}")) is FileSystemRoot
    assert type(detect_root("memory://x")) is FsspecRoot
    with pytest.raises(StorageDetectionError, match="Cannot detect"):
        detect_root("abc://abc.abc")
    with pytest.raises(StorageDetectionError, match="Cannot detect"):
        async_ckpt.CheckpointManager("abc://abc.abc", executor="thread")


@pytest.mark.parametrize("bad", ["abc://abc.abc", 42, None])
def test_undetectable_ids_raise_storage_detection_error(bad):
    with pytest.raises(StorageDetectionError, match="Cannot detect") as info:
        detect_writer(bad)
    assert isinstance(info.value, RuntimeError)
    if bad is not None:
        assert "storage_writer=" in str(info.value)
    with pytest.raises(StorageDetectionError, match="Cannot detect"):
        detect_reader(bad)


def test_file_url_round_trip(tmp_path):
    url = f"file://{tmp_path}/viaurl"
    async_ckpt.save({"t": torch.arange(3.0)}, checkpoint_id=url)
    assert (tmp_path / "viaurl" / "metadata.json").is_file()
    target = {"t": torch.zeros(3)}
    async_ckpt.load(target, checkpoint_id=url)
    assert target["t"].tolist() == [0.0, 1.0, 2.0]


def test_memory_url_round_trip(memory_url):
    state = {"t": torch.arange(10.0), "n": 3, "s": "x", "nested": {"b": torch.ones(2, 2)}}
    async_ckpt.save(state, checkpoint_id=memory_url)
    fs = fsspec.filesystem("memory")
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(memory_url.removeprefix("memory://"), False)}
    assert "metadata.json" in names and any(n.endswith(".data") for n in names)
    target = {"t": torch.zeros(10), "n": 0, "s": "", "nested": {"b": torch.zeros(2, 2)}}
    async_ckpt.load(target, checkpoint_id=memory_url)
    assert torch.equal(target["t"], state["t"]) and torch.equal(
        target["nested"]["b"], torch.ones(2, 2)
    )
    assert target["n"] == 3 and target["s"] == "x"


def test_memory_url_overwrite_removes_old_data(memory_url):
    async_ckpt.save({"t": torch.zeros(4)}, checkpoint_id=memory_url)
    meta = async_ckpt.save({"t": torch.ones(4)}, checkpoint_id=memory_url)
    fs = fsspec.filesystem("memory")
    data = {
        p.rsplit("/", 1)[-1]
        for p in fs.ls(memory_url.removeprefix("memory://"), False)
        if p.endswith(".data")
    }
    assert data == set(meta.files)
    target = {"t": torch.zeros(4)}
    async_ckpt.load(target, checkpoint_id=memory_url)
    assert torch.equal(target["t"], torch.ones(4))


def test_memory_url_missing_and_incomplete(memory_url):
    with pytest.raises(CheckpointNotFoundError):
        async_ckpt.load({"t": torch.zeros(1)}, checkpoint_id=memory_url)
    fsspec.filesystem("memory").pipe_file(
        f"{memory_url.removeprefix('memory://')}/abc-r0-0.data", b"partial"
    )
    with pytest.raises(IncompleteCheckpointError):
        async_ckpt.load({"t": torch.zeros(1)}, checkpoint_id=memory_url)


def test_storage_writer_and_reader_override_detection(tmp_path, memory_url):
    local = tmp_path / "not-used"
    state = {"t": torch.arange(5.0)}
    async_ckpt.save(state, checkpoint_id=local, storage_writer=FsspecWriter(memory_url))
    assert not local.exists()  # the explicit writer won over the id
    target = {"t": torch.zeros(5)}
    async_ckpt.load(target, checkpoint_id=local, storage_reader=FsspecReader(memory_url))
    assert torch.equal(target["t"], state["t"])

    # Without any checkpoint_id, the writer alone decides.
    async_ckpt.save(state, storage_writer=FileSystemWriter(tmp_path / "explicit"))
    target = {"t": torch.zeros(5)}
    async_ckpt.load(target, storage_reader=FileSystemReader(tmp_path / "explicit"))
    assert torch.equal(target["t"], state["t"])


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_known_protocol_without_its_package_names_the_package():
    with pytest.raises(MissingBackendError, match="gcsfs"):
        async_ckpt.save({"t": torch.ones(1)}, checkpoint_id="gs://bucket/ckpt")
