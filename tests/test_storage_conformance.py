"""One conformance suite for every storage backend, parametrised by backend factories.

Each backend gets the same scenarios: sync and async round trips, a load of a
subset of keys, an interrupted save that must not be visible as a checkpoint,
an overwrite that never mixes old and new data, checksums that catch a flipped
byte in storage, and the root listing and deletion CheckpointManager uses.

Backends: local, memory://, S3 (moto, marked ``s3``) and the toy plugin of
tests/test_storage_plugin.py, found through its entry point. To run the suite
on another backend, add a factory to :data:`BACKEND_FACTORIES` (see
docs/storage-backends.md) and run ``pytest tests/test_storage_conformance.py -k <name>``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import pytest
import torch
from s3_server import s3_bucket, s3_server  # noqa: F401  (fixtures)
from test_storage_plugin import install_toy_plugin

import async_ckpt as ac
from async_ckpt.storage import (
    FileSystemRoot,
    FsspecRoot,
    StorageRoot,
    detect_reader,
    detect_root,
    detect_writer,
    s3_transfer,
)


@dataclass
class Backend:
    """How the suite reaches one storage backend: checkpoints live under ``root``.

    ``make_writer(checkpoint_id, **options)`` must accept ``overwrite=``;
    ``get_bytes``/``put_bytes`` read and replace a stored file by its path below
    ``root`` (to damage one); ``cross_process``: whether a worker process's
    writes are visible here (else async saves use the thread executor).
    """

    name: str
    root: str
    make_writer: Callable[..., ac.StorageWriter]
    make_reader: Callable[[str], ac.StorageReader]
    make_root: Callable[[str], StorageRoot]
    get_bytes: Callable[[str], bytes]
    put_bytes: Callable[[str, bytes], None]
    cross_process: bool = True

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def writer(self, name: str, **options: Any) -> ac.StorageWriter:
        return self.make_writer(self.url(name), **options)

    def reader(self, name: str) -> ac.StorageReader:
        return self.make_reader(self.url(name))

    def exists(self, name: str) -> bool:
        try:
            self.get_bytes(name)
        except (FileNotFoundError, KeyError):
            return False
        return True


def _fsspec_files(root: str, options: dict[str, Any]) -> dict[str, Any]:
    """``get_bytes``/``put_bytes`` through fsspec, for the built-in backends."""

    def locate(name: str) -> tuple[Any, str]:
        fs, path = fsspec.core.url_to_fs(f"{root}/{name}", **options)
        fs.invalidate_cache()
        return fs, path

    def get_bytes(name: str) -> bytes:
        fs, path = locate(name)
        return fs.cat_file(path)

    def put_bytes(name: str, data: bytes) -> None:
        fs, path = locate(name)
        fs.pipe_file(path, data)

    return {"get_bytes": get_bytes, "put_bytes": put_bytes}


def local_backend(request: pytest.FixtureRequest) -> Backend:
    root = str(request.getfixturevalue("tmp_path"))
    return Backend(
        "local",
        root,
        ac.FileSystemWriter,
        ac.FileSystemReader,
        FileSystemRoot,
        **_fsspec_files(root, {}),
    )


def memory_backend(request: pytest.FixtureRequest) -> Backend:
    root = f"memory://conformance-{uuid.uuid4().hex[:8]}"

    def remove() -> None:
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)

    request.addfinalizer(remove)
    return Backend(
        "memory",
        root,
        ac.FsspecWriter,
        ac.FsspecReader,
        FsspecRoot,
        **_fsspec_files(root, {}),
        cross_process=False,
    )


def s3_backend(request: pytest.FixtureRequest) -> Backend:
    bucket = request.getfixturevalue("s3_bucket")
    root, options = bucket.url("ckpts").rstrip("/"), bucket.storage_options
    return Backend(
        "s3",
        root,
        lambda cid, **kw: ac.FsspecWriter(cid, storage_options=options, **kw),
        lambda cid: ac.FsspecReader(cid, storage_options=options),
        lambda root: FsspecRoot(root, storage_options=options),
        **_fsspec_files(root, options),
    )


def toy_backend(request: pytest.FixtureRequest) -> Backend:
    """The toy plugin, installed through its entry point and found by detection."""
    site = request.getfixturevalue("tmp_path_factory").mktemp("toy-site")
    toy = install_toy_plugin(site, request.getfixturevalue("monkeypatch"))
    root = f"toy://conformance-{uuid.uuid4().hex[:8]}"
    path = toy.path_of(root)

    def remove() -> None:
        with toy.LOCK:
            for key in [key for key in toy.FILES if key.startswith(path + "/")]:
                del toy.FILES[key]

    def get_bytes(name: str) -> bytes:
        with toy.LOCK:
            return toy.FILES[f"{path}/{name}"][0]

    def put_bytes(name: str, data: bytes) -> None:
        with toy.LOCK:
            toy.FILES[f"{path}/{name}"] = (data, time.time())

    request.addfinalizer(remove)
    return Backend(
        "toy",
        root,
        detect_writer,
        detect_reader,
        detect_root,
        get_bytes,
        put_bytes,
        cross_process=toy.ToyWriter.visible_across_processes,
    )


BACKEND_FACTORIES: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "local": local_backend,
    "memory": memory_backend,
    "s3": s3_backend,
    "toy": toy_backend,
}
MARKS = {"s3": pytest.mark.s3}


@pytest.fixture(
    params=[pytest.param(name, marks=MARKS.get(name, ())) for name in BACKEND_FACTORIES]
)
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKEND_FACTORIES[request.param](request)


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
    executor = "process" if backend.cross_process else "thread"
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


def test_interrupted_save_is_not_a_checkpoint(backend, monkeypatch):
    import async_ckpt.pipeline.write as write_mod

    monkeypatch.setattr(write_mod, "split_files", lambda sizes, n: [[i] for i in range(len(sizes))])
    writer = backend.writer("broken")
    writer.thread_count = 1  # one file at a time: the first is written, the second fails
    write_file, calls = writer.write_file, []

    def fail_after_first_file(name: str, segments: Any) -> None:
        calls.append(name)
        if len(calls) > 1:
            raise ConnectionError("connection reset by peer (injected)")
        write_file(name, segments)

    monkeypatch.setattr(writer, "write_file", fail_after_first_file)
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
    data = bytearray(backend.get_bytes(f"flip/{chunk.file}"))
    data[chunk.offset + 100] ^= 0x01
    backend.put_bytes(f"flip/{chunk.file}", bytes(data))
    with pytest.raises(ac.ChecksumMismatchError, match="big"):
        ac.load(_zeros_like(_state(8)), storage_reader=backend.reader("flip"))


def test_root_lists_measures_and_deletes_checkpoints(backend):
    ac.save(_state(9), storage_writer=backend.writer("a"))
    ac.save(_state(10), storage_writer=backend.writer("b"))
    crashed = backend.writer("c")  # a save that never committed
    crashed.prepare(coordinator=True)
    crashed.write_file("0123abcd-r0-0.data", [memoryview(b"partial")])
    root = backend.make_root(backend.root)
    assert root.exists()
    assert not backend.make_root(backend.url("nothing-here")).exists()
    assert root.children() == {"a": True, "b": True, "c": False}
    usage = root.usage("a")
    assert usage.size > 3 * 1024 * 1024
    assert usage.mtime is None or abs(time.time() - usage.mtime) < 3600
    assert root.usage("c").size == len(b"partial")
    assert root.identity("b") == backend.make_root(backend.root + "/").identity("b")
    assert root.identity("a") != root.identity("b")

    root.delete("a")
    root.delete("c")
    root.delete("a")  # gone already: no error
    assert root.children() == {"b": True}
    assert root.usage("a").size == 0
    with pytest.raises(ac.CheckpointNotFoundError):
        ac.load(_zeros_like(_state(9)), storage_reader=backend.reader("a"))
    target = _zeros_like(_state(10))
    ac.load(target, storage_reader=backend.reader("b"))
    _assert_equal(target, _state(10))


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
    pytest.importorskip("s3fs")
    assert type(detect_writer(checkpoint_id)) is writer_type


def test_unknown_scheme_cannot_be_detected():
    with pytest.raises(RuntimeError, match="Cannot detect"):
        ac.save({"w": torch.ones(1)}, checkpoint_id="abc://abc.abc")
