"""One conformance suite for every storage backend: local, memory://, and S3 (moto).

Each backend gets the same scenarios: sync and async round trips, a load of a
subset of keys, an interrupted save that must not be visible as a checkpoint,
and an overwrite that never mixes old and new data.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pytest
import torch
from s3_server import s3_bucket, s3_server  # noqa: F401  (fixtures)

import async_ckpt as ac
from async_ckpt.storage import s3_transfer


@dataclass
class Backend:
    """How to reach one storage backend in a test."""

    name: str
    root: str
    storage_options: dict[str, Any]

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def writer(self, name: str, **kwargs: Any) -> ac.StorageWriter:
        if self.name == "local":
            return ac.FileSystemWriter(self.url(name), **kwargs)
        return ac.FsspecWriter(self.url(name), storage_options=self.storage_options, **kwargs)

    def reader(self, name: str) -> ac.StorageReader:
        if self.name == "local":
            return ac.FileSystemReader(self.url(name))
        return ac.FsspecReader(self.url(name), storage_options=self.storage_options)

    def exists(self, name: str) -> bool:
        fs, path = fsspec.core.url_to_fs(self.url(name), **self.storage_options)
        fs.invalidate_cache()
        return fs.exists(path)


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request, tmp_path):
    if request.param == "local":
        yield Backend("local", str(tmp_path), {})
    elif request.param == "memory":
        root = f"memory://conformance-{uuid.uuid4().hex[:8]}"
        yield Backend("memory", root, {})
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield Backend("s3", bucket.url("ckpts").rstrip("/"), bucket.storage_options)


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)},
        "big": torch.randn(3 * 1024 * 1024 // 4 + 7, generator=g),  # spans S3 parts with a tail
        "step": seed,
        "tag": f"run-{seed}",
    }


def _zeros_like(state: dict) -> dict:
    return {
        "model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
        "big": torch.zeros_like(state["big"]),
        "step": -1,
        "tag": "",
    }


def _assert_equal(a: dict, b: dict) -> None:
    assert torch.equal(a["model"]["w"], b["model"]["w"])
    assert torch.equal(a["model"]["b"], b["model"]["b"])
    assert torch.equal(a["big"], b["big"])
    assert (a["step"], a["tag"]) == (b["step"], b["tag"])


def test_sync_round_trip(backend):
    state = _state(1)
    meta = ac.save(state, storage_writer=backend.writer("sync"))
    assert meta.total_bytes > 3 * 1024 * 1024
    target = _zeros_like(state)
    ac.load(target, storage_reader=backend.reader("sync"))
    _assert_equal(target, state)


def test_async_round_trip(backend):
    state = _state(2)
    executor = "thread" if backend.name == "memory" else "process"
    with ac.AsyncCheckpointer(executor=executor) as ckpt:
        fut = ckpt.save(state, storage_writer=backend.writer("async"))
        expected = {**state, "model": {k: v.clone() for k, v in state["model"].items()}}
        state["model"]["w"].add_(1)  # training goes on after staging
        fut.result(timeout=120)
    target = _zeros_like(state)
    ac.load(target, storage_reader=backend.reader("async"))
    _assert_equal(target, expected)


def test_load_subset_of_keys(backend):
    state = _state(3)
    ac.save(state, storage_writer=backend.writer("subset"))
    target = {"model": {"w": torch.zeros(64, 32)}}
    result = ac.load(target, storage_reader=backend.reader("subset"), strict=False)
    assert torch.equal(target["model"]["w"], state["model"]["w"])
    assert set(result.unexpected_keys) == {"model.b", "big", "step", "tag"}


class _FailAfterFirstFile:
    """Wraps a writer: the first data file is written, the second upload fails."""

    def __init__(self, inner: ac.StorageWriter) -> None:
        self.inner = inner
        self.checkpoint_id = inner.checkpoint_id
        self.thread_count = 1
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def write_file(self, name, segments, block_size):
        self.calls += 1
        if self.calls > 1:
            raise ConnectionError("connection reset by peer (injected)")
        return self.inner.write_file(name, segments, block_size)


def test_interrupted_save_is_not_a_checkpoint(backend, monkeypatch):
    import async_ckpt.pipeline.write as write_mod

    monkeypatch.setattr(write_mod, "split_files", lambda sizes, n: [[i] for i in range(len(sizes))])
    writer = _FailAfterFirstFile(backend.writer("broken"))
    with pytest.raises(Exception, match="injected"):
        ac.save(_state(4), storage_writer=writer)
    with pytest.raises((ac.IncompleteCheckpointError, ac.CheckpointNotFoundError)):
        ac.load(_zeros_like(_state(4)), storage_reader=backend.reader("broken"))
    assert not backend.exists("broken/metadata.json")


def test_overwrite_replaces_atomically(backend):
    ac.save(_state(5), storage_writer=backend.writer("same"))
    ac.save(_state(6), storage_writer=backend.writer("same"))
    target = _zeros_like(_state(6))
    ac.load(target, storage_reader=backend.reader("same"))
    _assert_equal(target, _state(6))
    with pytest.raises(ac.CheckpointExistsError):
        ac.save(_state(7), storage_writer=backend.writer("same", overwrite=False))


def test_checksum_guards_object_store_bytes(backend):
    ac.save(_state(8), storage_writer=backend.writer("flip"))
    reader = backend.reader("flip")
    meta = ac.Metadata  # noqa: F841 - the type is public
    from async_ckpt.format import decode_metadata

    decoded = decode_metadata(reader.read_metadata())
    chunk = decoded.entries["big"].chunks[0]
    fs, path = fsspec.core.url_to_fs(backend.url(f"flip/{chunk.file}"), **backend.storage_options)
    data = bytearray(fs.cat_file(path))
    data[chunk.offset + 100] ^= 0x01
    fs.pipe_file(path, bytes(data))
    with pytest.raises(ac.ChecksumMismatchError, match="big"):
        ac.load(_zeros_like(_state(8)), storage_reader=backend.reader("flip"))


def test_part_splitting_keeps_bytes_in_order():
    segments = [memoryview(bytes(range(256)) * 40), memoryview(b"x" * 7), memoryview(b"yz" * 5000)]
    parts = s3_transfer._parts(segments, 4096)
    joined = b"".join(b"".join(bytes(v) for v in p) for p in parts)
    assert joined == b"".join(bytes(s) for s in segments)
    assert all(sum(len(v) for v in p) == 4096 for p in parts[:-1])


def test_part_size_respects_part_limit():
    assert s3_transfer.part_size_for(10 * 2**40) * s3_transfer.MAX_PARTS >= 10 * 2**40
    assert s3_transfer.part_size_for(1) == s3_transfer.DEFAULT_PART


def test_memory_url_refused_by_process_executor():
    with ac.AsyncCheckpointer(executor="process") as ckpt:
        with pytest.raises(ac.CheckpointError, match="executor='thread'"):
            ckpt.save({"w": torch.ones(2)}, checkpoint_id="memory://x/y")


def test_missing_backend_package_names_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("gcsfs"):
            raise ImportError("No module named 'gcsfs'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ac.MissingBackendError, match="gcsfs"):
        ac.save({"w": torch.ones(1)}, checkpoint_id="gs://bucket/ckpt")


@pytest.mark.parametrize(
    ("checkpoint_id", "writer_type"),
    [
        ("s3://bucket/ckpt", ac.FsspecWriter),
        ("memory://x", ac.FsspecWriter),
        ("/tmp/x", ac.FileSystemWriter),
    ],
)
def test_detection_picks_backend(checkpoint_id, writer_type):
    from async_ckpt.storage import detect_writer

    pytest.importorskip("s3fs")
    assert type(detect_writer(checkpoint_id)) is writer_type


def test_unknown_scheme_cannot_be_detected():
    with pytest.raises(RuntimeError, match="Cannot detect"):
        ac.save({"w": torch.ones(1)}, checkpoint_id="abc://abc.abc")
