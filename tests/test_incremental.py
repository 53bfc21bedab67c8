"""Incremental saves (docs/incremental.md): unchanged chunks are shared with the base,
never written again, and every checkpoint still loads on its own."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import async_ckpt
from async_ckpt.cli import main as cli_main
from async_ckpt.errors import MetadataError
from async_ckpt.format.decode import decode_metadata
from async_ckpt.format.metadata import DIGEST_VERSION, FORMAT_VERSION
from async_ckpt.format.names import DATA_FILE
from async_ckpt.manager import CheckpointManager
from async_ckpt.pipeline.incremental import SHARED_FILE_INDEX, SLICE_BYTES, content_digest
from async_ckpt.storage.local import FileSystemWriter
from async_ckpt.tools.verify import verify_checkpoint

MiB = 1024 * 1024


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "frozen": torch.randn(512, 1024, generator=g),  # 2 MiB
        "trained": torch.randn(256, 1024, generator=g),  # 1 MiB
        "step": 1,
    }


def _empty_like(state: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if torch.is_tensor(v) else 0 for k, v in state.items()}


def _save(state: dict, path: Path, **kwargs: Any) -> Any:
    return async_ckpt.save(state, checkpoint_id=str(path), no_dist=True, **kwargs)


def _load(path: Path, like: dict[str, Any]) -> dict[str, Any]:
    out = _empty_like(like)
    async_ckpt.load(out, checkpoint_id=str(path), no_dist=True)
    return out


def _assert_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k


def _new_bytes(meta: Any) -> int:
    return meta.new_bytes


def _shared(meta: Any) -> set[str]:
    """The files of ``meta`` its save shared from a base (numbered from SHARED_FILE_INDEX)."""
    return {n for n in meta.files if DATA_FILE.match(n) and _index(n) >= SHARED_FILE_INDEX}


def _index(name: str) -> int:
    return int(DATA_FILE.match(name)["index"])


def _inode(path: Path) -> int:
    return path.stat().st_ino


def test_unchanged_chunks_are_linked_not_written_and_survive_the_base(tmp_path: Path) -> None:
    state = _state()
    first = _save(state, tmp_path / "a", incremental=True)
    assert first.version == DIGEST_VERSION
    assert first.incremental == {
        "new_bytes": first.total_bytes,
        "shared_bytes": 0,
        "shared_files": 0,
    }
    state["trained"].add_(1.0)
    state["step"] = 2
    second = _save(state, tmp_path / "b", base=tmp_path / "a")
    # the frozen tensor's file is the base's, linked under a name of this save
    [shared] = _shared(second)
    [base_file] = {c.file for c in first.entries["frozen"].chunks}
    assert second.incremental == {
        "base": str(tmp_path / "a"),
        "new_bytes": 1 * MiB,
        "shared_bytes": 2 * MiB,
        "shared_files": 1,
    }
    assert _inode(tmp_path / "a" / base_file) == _inode(tmp_path / "b" / shared)
    assert _new_bytes(second) == 1 * MiB
    frozen = decode_metadata((tmp_path / "b" / "metadata.json").read_bytes()).entries["frozen"]
    assert {c.file for c in frozen.chunks} == {shared}
    shutil.rmtree(tmp_path / "a")  # rm -r of the base breaks nothing
    _assert_equal(_load(tmp_path / "b", state), state)
    assert verify_checkpoint(str(tmp_path / "b")).ok


def test_equality_is_by_content_not_by_version_counter(tmp_path: Path) -> None:
    state = _state()
    _save(state, tmp_path / "a", incremental=True)
    state["frozen"].copy_(state["frozen"].clone())  # written to (version bumped), same bytes
    state["trained"][0, 0] = 123.0  # one element differs: the whole 1 MiB tensor is new
    second = _save(state, tmp_path / "b", base=tmp_path / "a")
    assert _new_bytes(second) == 1 * MiB
    _assert_equal(_load(tmp_path / "b", state), state)


def test_a_big_tensor_rewrites_only_the_row_blocks_that_changed(tmp_path: Path) -> None:
    rows, cols = 4 * SLICE_BYTES // (4 * 2048), 2048  # four row blocks of float32
    table = torch.randn(rows, cols)
    state = {"embedding": table}
    first = _save(state, tmp_path / "a", incremental=True)
    assert len(first.entries["embedding"].chunks) == 4
    table[rows - 1, 7] += 1.0  # one row of the last block
    second = _save(state, tmp_path / "b", base=tmp_path / "a")
    assert _new_bytes(second) == SLICE_BYTES
    chunk = max(second.entries["embedding"].chunks, key=lambda c: c.offsets[0])  # the last
    assert chunk.file not in _shared(second) and len(_shared(second)) == 3  # a file per block
    assert chunk.digest == content_digest(memoryview(table[chunk.offsets[0] :].numpy()).cast("B"))
    shutil.rmtree(tmp_path / "a")
    _assert_equal(_load(tmp_path / "b", state), state)


def test_a_missing_base_writes_every_byte_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = _state()
    with caplog.at_level(logging.WARNING):
        meta = _save(state, tmp_path / "b", base=tmp_path / "never-saved")
    assert "has no committed checkpoint" in caplog.text
    assert meta.incremental["shared_files"] == 0 and meta.version == DIGEST_VERSION
    assert meta.new_bytes == meta.total_bytes
    _assert_equal(_load(tmp_path / "b", state), state)


def test_a_base_deleted_after_it_was_read_means_its_chunks_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from async_ckpt.pipeline.incremental import BaseChunks

    state = _state()
    _save(state, tmp_path / "a", incremental=True)
    state["trained"].add_(1.0)
    load = BaseChunks.load

    def load_then_delete(writer: Any, base: str, *args: Any) -> Any:
        chunks = load(writer, base, *args)  # the base's digests are known...
        shutil.rmtree(base)  # ...and its files go (retention, another job) before any link
        return chunks

    monkeypatch.setattr(BaseChunks, "load", staticmethod(load_then_delete))
    meta = _save(state, tmp_path / "b", base=tmp_path / "a")
    assert meta.incremental["shared_files"] == 0 and meta.new_bytes == meta.total_bytes
    _assert_equal(_load(tmp_path / "b", state), state)


def test_a_truncated_base_file_is_not_shared(tmp_path: Path) -> None:
    state = _state()
    first = _save(state, tmp_path / "a", incremental=True)
    [frozen_file] = {c.file for c in first.entries["frozen"].chunks}
    with open(tmp_path / "a" / frozen_file, "r+b") as f:
        f.truncate(1000)  # damaged after its commit: sharing it would commit a broken file
    meta = _save(state, tmp_path / "b", base=tmp_path / "a")
    assert frozen_file not in meta.files  # written anew; the untouched trained file is shared
    assert meta.incremental["shared_files"] == 1 and meta.new_bytes == 2 * MiB
    _assert_equal(_load(tmp_path / "b", state), state)


def test_a_failed_save_removes_its_links_and_leaves_the_base_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _state()
    _save(state, tmp_path / "a", incremental=True)
    state["trained"].add_(1.0)
    _failing_writes_to(monkeypatch, FileSystemWriter, "/b")
    with pytest.raises(OSError, match="injected"):
        _save(state, tmp_path / "b", base=tmp_path / "a")
    assert [p.name for p in (tmp_path / "b").iterdir()] == []  # the link went with the save
    assert verify_checkpoint(str(tmp_path / "a")).ok


def test_a_save_over_its_own_base_never_deletes_the_files_it_shares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _state()
    first = _save(before, tmp_path / "a", incremental=True)
    changed = _state()
    changed["frozen"].copy_(before["frozen"])
    changed["trained"].add_(5.0)

    def failing_commit(self: FileSystemWriter, metadata: bytes) -> bytes | None:
        raise OSError("injected: commit failed")

    with monkeypatch.context() as patch:
        patch.setattr(FileSystemWriter, "commit", failing_commit)
        with pytest.raises(OSError, match="commit failed"):
            _save(changed, tmp_path / "a", base=tmp_path / "a")
    _assert_equal(_load(tmp_path / "a", before), before)  # the old commit still loads
    meta = _save(changed, tmp_path / "a", base=tmp_path / "a")
    # the frozen tensor's file, under a second name of the new save: the commit removed
    # the old name with the rest of what it replaced, the bytes stay
    [shared] = _shared(meta)
    assert {c.file for c in meta.entries["frozen"].chunks} == {shared}
    assert not set(first.files) & set(meta.files)
    _assert_equal(_load(tmp_path / "a", changed), changed)
    listed = set(meta.files) | {"metadata.json"}
    assert {p.name for p in (tmp_path / "a").iterdir()} == listed  # old trained file gone


def test_metadata_version_3_carries_digests_and_version_2_may_not(tmp_path: Path) -> None:
    state = _state()
    full = _save(state, tmp_path / "full")
    assert full.version == FORMAT_VERSION == 2
    assert all(c.digest is None for c in full.entries["frozen"].chunks)
    inc = _save(state, tmp_path / "inc", incremental=True)
    raw = (tmp_path / "inc" / "metadata.json").read_bytes()
    assert b'"digest":"' in raw and b'"version":3' in raw
    assert decode_metadata(raw).entries == inc.entries
    # the same document claiming version 2 is refused: a digest is a version-3 field
    from async_ckpt.format.metadata import encode_metadata

    downgraded = encode_metadata(type(inc)(**{**inc.__dict__, "version": 2}))
    with pytest.raises(MetadataError, match="unknown fields \\['digest'\\]"):
        decode_metadata(downgraded)


@pytest.mark.parametrize("async_staging", [False, True])
def test_async_saves_share_with_their_base_through_the_worker(
    tmp_path: Path, async_staging: bool
) -> None:
    state = _state()
    stager = async_ckpt.Stager(async_staging=async_staging)
    with async_ckpt.AsyncCheckpointer(no_dist=True, stager=stager) as ckpt:
        ckpt.save(state, checkpoint_id=str(tmp_path / "a"), incremental=True).result()
        state["trained"].mul_(2.0)
        # with async staging this second save is walked and handed over on the staging thread
        meta = ckpt.save(state, checkpoint_id=str(tmp_path / "b"), base=str(tmp_path / "a"))
        meta = meta.result()
    assert _new_bytes(meta) == 1 * MiB
    shutil.rmtree(tmp_path / "a")
    _assert_equal(_load(tmp_path / "b", state), state)


def test_manager_keeps_every_step_whole_and_disk_use_near_one_checkpoint(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    state = {"frozen": torch.randn(9 * 256, 1024, generator=g), "head": torch.randn(256, 1024)}
    saved = {}
    with CheckpointManager(tmp_path, keep_last=5, incremental=True, executor="thread") as mgr:
        for step in range(1, 9):
            state["head"].add_(1.0)
            mgr.save(step, state).result()
            saved[step] = {k: v.clone() for k, v in state.items()}
        kept = mgr.steps()
    assert kept == [4, 5, 6, 7, 8]
    for step in kept:
        _assert_equal(_load(tmp_path / f"step-{step:08d}", state), saved[step])
    inodes = {}
    for path in tmp_path.rglob("*.data"):
        st = path.stat()
        inodes[st.st_ino] = st.st_size
    full = sum(t.numel() * 4 for t in state.values())
    assert sum(inodes.values()) <= 1.5 * full  # 10 MiB: 9 frozen + 5 x 1 head


def test_inspect_shows_the_new_and_the_shared_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = _state()
    _save(state, tmp_path / "a", incremental=True)
    state["trained"].add_(1.0)
    _save(state, tmp_path / "b", base=tmp_path / "a")
    assert cli_main(["inspect", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"incremental: 1.0 MiB new, 2.0 MiB in 1 file shared with {tmp_path / 'a'}" in out


def test_object_store_shares_by_server_side_copy(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = f"memory://inc-{os.getpid()}"
    state = _state()
    with async_ckpt.AsyncCheckpointer(no_dist=True, executor="thread") as ckpt:
        ckpt.save(state, checkpoint_id=f"{root}/a", incremental=True).result()
        state["trained"].add_(1.0)
        meta = ckpt.save(state, checkpoint_id=f"{root}/b", base=f"{root}/a").result()
    assert _new_bytes(meta) == 1 * MiB
    fs.rm(f"{root}/a", recursive=True)
    out = _empty_like(state)
    async_ckpt.load(out, checkpoint_id=f"{root}/b", no_dist=True)
    _assert_equal(out, state)
    fs.rm(root, recursive=True)


@pytest.mark.parametrize("bad", [3, "", b"bytes"])
def test_a_bad_base_is_refused_at_the_call(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(async_ckpt.CheckpointError, match="base must be"):
        _save(_state(), tmp_path / "b", base=bad)


# ----------------------------------------------------------------------------- two ranks

ROWS = 4 * SLICE_BYTES // (4 * 256)  # rows of 256 float32: four row blocks in all, two per rank


def _full_table() -> torch.Tensor:
    return torch.arange(ROWS * 256, dtype=torch.float32).reshape(ROWS, 256)


def _two_rank_incremental_body(rank: int, world: int, root: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    table = distribute_tensor(_full_table(), mesh, [Shard(0)])
    state = {"table": table, "step": 1}
    with async_ckpt.AsyncCheckpointer() as ckpt:
        ckpt.save(state, checkpoint_id=f"{root}/a", incremental=True).result()
        if rank == 1:
            table.to_local()[-1, 0] = -1.0  # one element in rank 1's last row block
        state["step"] = 2
        meta = ckpt.save(state, checkpoint_id=f"{root}/b", base=f"{root}/a").result()
    return {"new": _new_bytes(meta), "shared": sorted(_shared(meta))}


def _two_rank_load_body(rank: int, world: int, root: str) -> bool:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    target = {"table": distribute_tensor(torch.zeros(ROWS, 256), mesh, [Shard(0)]), "step": 0}
    async_ckpt.load(target, checkpoint_id=f"{root}/b")
    expected = _full_table()
    expected[-1, 0] = -1.0
    assert torch.equal(target["table"].full_tensor(), expected) and target["step"] == 2
    return True


@pytest.mark.multiprocess
def test_two_ranks_share_their_unchanged_row_blocks(tmp_path: Path) -> None:
    from dist_utils import run_ranks

    results = run_ranks(_two_rank_incremental_body, 2, str(tmp_path))
    assert results[0] == results[1]  # the committed metadata, seen by both ranks
    assert results[0]["new"] == SLICE_BYTES  # one of the four row blocks
    assert {name.split("-r")[1][0] for name in results[0]["shared"]} == {"0", "1"}
    shutil.rmtree(tmp_path / "a")
    assert run_ranks(_two_rank_load_body, 2, str(tmp_path)) == [True, True]


def test_convert_reads_an_incremental_checkpoint_whose_base_is_gone(tmp_path: Path) -> None:
    state = _state()
    _save(state, tmp_path / "a", incremental=True)
    state["trained"].add_(1.0)
    _save(state, tmp_path / "b", base=tmp_path / "a")
    shutil.rmtree(tmp_path / "a")
    out = tmp_path / "b.pt"
    assert cli_main(["convert", str(tmp_path / "b"), str(out), "--to", "torch"]) == 0
    loaded = torch.load(out, weights_only=True)
    assert torch.equal(loaded["frozen"], state["frozen"])
    assert torch.equal(loaded["trained"], state["trained"]) and loaded["step"] == 1


def test_a_save_queued_behind_its_base_shares_with_it(tmp_path: Path) -> None:
    """Two saves in flight: the second names the first, not yet committed, as its base;
    the worker runs saves in order, so the base is committed when the second reads it."""
    state = _state()
    with async_ckpt.AsyncCheckpointer(no_dist=True) as ckpt:
        first = ckpt.save(state, checkpoint_id=str(tmp_path / "a"), incremental=True)
        expected_a = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
        state["trained"].add_(1.0)  # allowed: synchronous staging returned after the copy
        second = ckpt.save(state, checkpoint_id=str(tmp_path / "b"), base=str(tmp_path / "a"))
        a, b = first.result(), second.result()
    assert b.incremental["shared_files"] == 1 and b.new_bytes == 1 * MiB
    [shared] = _shared(b)
    [frozen] = {c.file for c in a.entries["frozen"].chunks}
    assert _inode(tmp_path / "a" / frozen) == _inode(tmp_path / "b" / shared)
    _assert_equal(_load(tmp_path / "a", state), expected_a)
    _assert_equal(_load(tmp_path / "b", state), state)


def test_ls_counts_a_file_shared_by_several_steps_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = _state()
    with CheckpointManager(tmp_path, keep_last=None, incremental=True, executor="thread") as mgr:
        for step in (1, 2, 3):
            state["trained"].add_(1.0)
            mgr.save(step, state).result()
    assert cli_main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # the 2 MiB frozen file once and three 1 MiB trained files (plus three small metadata)
    assert "3 committed, 0 incomplete, 5.0 MiB in total" in out


def _failing_writes_to(monkeypatch: pytest.MonkeyPatch, cls: Any, marker: str) -> None:
    original = cls.write_file

    def write_file(self: Any, name: str, segments: Any) -> None:
        if self.checkpoint_id.endswith(marker):
            raise OSError(f"injected failure writing {name}")
        original(self, name, segments)

    monkeypatch.setattr(cls, "write_file", write_file)


@pytest.mark.parametrize("store", ["local", "memory"])
def test_a_failed_save_never_removes_what_a_committed_save_to_the_same_id_shares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    """Saves to one id with one base: the second fails after sharing; the first's files,
    shared under names of its own save, stay (before, both used the base's file names)."""
    from async_ckpt.storage.fsspec_backend import FsspecWriter

    root = str(tmp_path) if store == "local" else f"memory://shared-{os.getpid()}"
    state = _state()
    with async_ckpt.AsyncCheckpointer(no_dist=True, executor="thread") as ckpt:
        ckpt.save(state, checkpoint_id=f"{root}/anchor", incremental=True).result()
        state["trained"].add_(1.0)
        latest = f"{root}/latest"
        ckpt.save(state, checkpoint_id=latest, base=f"{root}/anchor").result()
        committed = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
        state["trained"].add_(1.0)
        _failing_writes_to(
            monkeypatch, FileSystemWriter if store == "local" else FsspecWriter, "latest"
        )
        with pytest.raises(OSError, match="injected failure"):
            ckpt.save(state, checkpoint_id=latest, base=f"{root}/anchor").result()
    out = _empty_like(state)
    async_ckpt.load(out, checkpoint_id=latest, no_dist=True)
    _assert_equal(out, committed)
    if store == "memory":
        import fsspec

        fsspec.filesystem("memory").rm(root, recursive=True)


def test_a_store_without_server_side_copy_writes_every_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    def no_copy(self: Any, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("no server-side copy on this store")

    monkeypatch.setattr(MemoryFileSystem, "copy", no_copy)
    root = f"memory://nocopy-{os.getpid()}"
    state = _state()
    with async_ckpt.AsyncCheckpointer(no_dist=True, executor="thread") as ckpt:
        ckpt.save(state, checkpoint_id=f"{root}/a", incremental=True).result()
        meta = ckpt.save(state, checkpoint_id=f"{root}/b", base=f"{root}/a").result()
    assert meta.incremental["shared_files"] == 0 and meta.new_bytes == meta.total_bytes
    out = _empty_like(state)
    async_ckpt.load(out, checkpoint_id=f"{root}/b", no_dist=True)
    _assert_equal(out, state)
    fsspec.filesystem("memory").rm(root, recursive=True)


def test_a_linked_file_looks_as_new_as_the_save_that_linked_it(tmp_path: Path) -> None:
    """Ages decide what is a dead save's leftover; a link keeps the file's old mtime."""
    state = _state()
    first = _save(state, tmp_path / "a", incremental=True)
    hours_ago = time.time() - 7200
    for name in first.files:
        os.utime(tmp_path / "a" / name, (hours_ago, hours_ago))
    second = _save(state, tmp_path / "b", base=tmp_path / "a")
    assert len(_shared(second)) == 2  # nothing changed: both files shared
    for name in _shared(second):
        assert os.stat(tmp_path / "b" / name).st_mtime > time.time() - 600
