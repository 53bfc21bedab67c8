"""The commit protocol: metadata last and atomic, overwrite, and saves killed mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import data_files, read_meta, wait_until

import async_ckpt
from async_ckpt import CheckpointExistsError, IncompleteCheckpointError

TESTS = Path(__file__).resolve().parent

# A child that saves ~200 MB (4 tensors, so 4 data files) to argv[1] and stops with its
# first data file half written, waiting at the gate argv[2] (which nobody opens).
_BIG_SAVE = textwrap.dedent(
    """
    import sys, torch, async_ckpt
    sys.path.insert(0, sys.argv[3])
    from faulty_storage import StopAtWriter
    state = {f"t{i}": torch.full((12_500_000,), float(i + 100)) for i in range(4)}
    writer = StopAtWriter(sys.argv[1], gate=sys.argv[2], point="mid-write", sync_files=True)
    async_ckpt.save(state, storage_writer=writer)
    print("committed", flush=True)
    """
)


def _kill_mid_write(path: Path, gate: Path) -> subprocess.Popen:
    """Run the big save into ``path``; SIGKILL it while its first data file is half written.

    The save waits at the gate until it is killed, so it can never commit first, however
    long this process takes to notice (a loaded machine).
    """
    child = subprocess.Popen(
        [sys.executable, "-c", _BIG_SAVE, str(path), str(gate), str(TESTS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reached = gate / "mid-write.reached"
    try:
        wait_until(
            lambda: reached.exists() or child.poll() is not None,
            120,
            "the save never wrote its first data file",
        )
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL, f"the save ended on its own: {err.decode()}"
    assert int(reached.read_text()) == child.pid  # the synchronous save writes in-process
    return child


def _small_state(value: float) -> dict:
    return {"w": torch.full((1000,), value), "b": torch.arange(7) * int(value), "note": str(value)}


def _load_small(path: Path) -> dict:
    target = {"w": torch.zeros(1000), "b": torch.zeros(7, dtype=torch.int64), "note": ""}
    async_ckpt.load(target, checkpoint_id=path)
    return target


def _assert_small(loaded: dict, value: float) -> None:
    expected = _small_state(value)
    assert torch.equal(loaded["w"], expected["w"]) and torch.equal(loaded["b"], expected["b"])
    assert loaded["note"] == expected["note"]


# ---------------------------------------------------------------------------- killed saves


@pytest.mark.multiprocess
def test_a_killed_save_leaves_the_previous_checkpoint_and_no_new_one(tmp_path, gate):
    previous, new = tmp_path / "step-1", tmp_path / "step-2"
    async_ckpt.save(_small_state(1.0), checkpoint_id=previous)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}

    _kill_mid_write(new, gate)

    assert data_files(new), "the child was killed before it wrote anything"
    assert not (new / "metadata.json").exists()
    with pytest.raises(IncompleteCheckpointError):
        async_ckpt.load({"t0": torch.zeros(12_500_000)}, checkpoint_id=new)
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    _assert_small(_load_small(previous), 1.0)


@pytest.mark.multiprocess
def test_a_save_killed_mid_overwrite_leaves_the_old_checkpoint(tmp_path, gate):
    path = tmp_path / "latest"
    async_ckpt.save(_small_state(1.0), checkpoint_id=path)
    old_files = set(data_files(path))
    old_metadata = (path / "metadata.json").read_bytes()

    _kill_mid_write(path, gate)

    assert set(data_files(path)) > old_files  # the killed save had started writing
    assert (path / "metadata.json").read_bytes() == old_metadata
    _assert_small(_load_small(path), 1.0)

    # The next commit deletes the files of the metadata it replaced; the killed save's
    # files are young, so they could belong to a live writer and stay ...
    orphans = set(data_files(path)) - old_files
    async_ckpt.save(_small_state(3.0), checkpoint_id=path)
    meta = read_meta(path)
    assert set(data_files(path)) == set(meta["files"]) | orphans
    _assert_small(_load_small(path), 3.0)

    # ... until nobody has written to them for the orphan grace.
    for name in orphans:
        os.utime(path / name, (0, 0))
    async_ckpt.save(_small_state(4.0), checkpoint_id=path)
    meta = read_meta(path)
    assert set(data_files(path)) == set(meta["files"])
    assert not [p for p in path.iterdir() if p.name.startswith(".metadata.json.tmp")]
    _assert_small(_load_small(path), 4.0)


# ---------------------------------------------------------------------------- overwrite


def test_saving_to_an_existing_id_replaces_it(ckpt_dir):
    async_ckpt.save(_small_state(1.0), checkpoint_id=ckpt_dir)
    first = set(data_files(ckpt_dir))
    meta = async_ckpt.save(_small_state(2.0), checkpoint_id=ckpt_dir)
    second = set(data_files(ckpt_dir))
    assert first and second and not first & second  # every old data file is gone
    assert second == set(meta.files)
    assert all(name.startswith(meta.save_id) for name in second)
    _assert_small(_load_small(ckpt_dir), 2.0)


def test_overwrite_false_refuses_an_existing_checkpoint(ckpt_dir):
    async_ckpt.save(_small_state(1.0), checkpoint_id=ckpt_dir)
    before = sorted(p.name for p in ckpt_dir.iterdir())
    writer = async_ckpt.FileSystemWriter(ckpt_dir, overwrite=False)
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        async_ckpt.save(_small_state(2.0), storage_writer=writer)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before
    _assert_small(_load_small(ckpt_dir), 1.0)


def test_overwrite_false_writes_a_new_checkpoint(ckpt_dir):
    writer = async_ckpt.FileSystemWriter(ckpt_dir, overwrite=False)
    async_ckpt.save(_small_state(4.0), storage_writer=writer)
    _assert_small(_load_small(ckpt_dir), 4.0)


def test_overwrite_false_on_an_incomplete_checkpoint_writes(ckpt_dir):
    """Only committed metadata makes a checkpoint exist; leftovers of a crash do not."""
    ckpt_dir.mkdir()
    (ckpt_dir / "deadbeef-r0-0.data").write_bytes(b"partial")
    os.utime(ckpt_dir / "deadbeef-r0-0.data", (0, 0))  # long dead: swept by the commit
    (ckpt_dir / "feedbeef-r0-0.data").write_bytes(b"in progress")  # young: may be live
    writer = async_ckpt.FileSystemWriter(ckpt_dir, overwrite=False)
    async_ckpt.save(_small_state(5.0), storage_writer=writer)
    assert "deadbeef-r0-0.data" not in data_files(ckpt_dir)
    assert (ckpt_dir / "feedbeef-r0-0.data").read_bytes() == b"in progress"
    _assert_small(_load_small(ckpt_dir), 5.0)


def test_fsspec_overwrite_false_refuses_an_existing_checkpoint(memory_url):
    url = memory_url
    async_ckpt.save(_small_state(1.0), checkpoint_id=url)
    with pytest.raises(CheckpointExistsError):
        async_ckpt.save(
            _small_state(2.0), storage_writer=async_ckpt.FsspecWriter(url, overwrite=False)
        )
    _assert_small(_load_small(url), 1.0)


# ---------------------------------------------------------------------------- commit order


class RecordingWriter(async_ckpt.FileSystemWriter):
    """Records the protocol calls, and what was on disk at commit time."""

    def __init__(self, path, fail_in_write: bool | str = False):
        super().__init__(path)
        self.calls: list[str] = []
        self.metadata_existed_at_commit: bool | None = None
        self.fail_in_write = fail_in_write

    def prepare(self, *, coordinator):
        self.calls.append("prepare")
        super().prepare(coordinator=coordinator)

    def write_file(self, name, segments):
        self.calls.append("write_file")
        super().write_file(name, segments)
        if self.fail_in_write is True or self.fail_in_write == name[-7:]:
            raise OSError(28, "No space left on device (simulated)")

    def commit(self, metadata):
        self.calls.append("commit")
        self.metadata_existed_at_commit = (self.path / "metadata.json").exists()
        return super().commit(metadata)

    def remove_files(self, names):
        self.calls.append("remove_files")
        return super().remove_files(names)

    def abort(self, names):
        self.calls.append("abort")
        super().abort(names)


def test_metadata_is_written_last(ckpt_dir):
    writer = RecordingWriter(ckpt_dir)
    async_ckpt.save(_small_state(1.0), storage_writer=writer)
    after_commit = writer.calls[writer.calls.index("commit") + 1 :]
    assert writer.calls[0] == "prepare" and set(after_commit) == {"remove_files"}
    assert writer.calls.count("write_file") >= 2 and writer.calls.count("commit") == 1
    assert writer.metadata_existed_at_commit is False
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(
        [*data_files(ckpt_dir), "metadata.json"]
    )


def test_a_failed_write_commits_nothing_and_keeps_the_old_checkpoint(ckpt_dir):
    async_ckpt.save(_small_state(1.0), checkpoint_id=ckpt_dir)
    before = sorted(p.name for p in ckpt_dir.iterdir())
    writer = RecordingWriter(ckpt_dir, fail_in_write=True)
    with pytest.raises(OSError, match="No space left"):
        async_ckpt.save(_small_state(2.0), storage_writer=writer)
    assert "commit" not in writer.calls and writer.calls[-1] == "abort"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before  # its files were deleted
    _assert_small(_load_small(ckpt_dir), 1.0)


def test_files_written_before_another_file_failed_are_removed(ckpt_dir, monkeypatch):
    monkeypatch.setattr("async_ckpt.pipeline.save.new_save_id", lambda: "feedface")
    writer = RecordingWriter(ckpt_dir, fail_in_write="-1.data")  # only the second file fails
    state = {f"t{i}": torch.full((1000 * (i + 1),), 1.0) for i in range(4)}
    with pytest.raises(OSError, match="No space left"):
        async_ckpt.save(state, storage_writer=writer)
    assert writer.calls.count("write_file") == 4
    assert data_files(ckpt_dir) == []


def test_a_failed_first_save_leaves_an_incomplete_checkpoint(ckpt_dir):
    with pytest.raises(OSError):
        async_ckpt.save(_small_state(2.0), storage_writer=RecordingWriter(ckpt_dir, True))
    with pytest.raises(IncompleteCheckpointError):
        _load_small(ckpt_dir)


def test_local_commit_fsyncs_data_metadata_and_directory(ckpt_dir, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    meta = async_ckpt.save(_small_state(1.0), checkpoint_id=ckpt_dir)
    names = [Path(p).name for p in synced]
    for data in meta.files:
        assert data in names
    assert any(n.startswith(".metadata.json.tmp-") for n in names)
    assert names.count(ckpt_dir.name) >= 2  # directory before and after the rename
    assert names.index(ckpt_dir.name) > max(names.index(d) for d in meta.files)

    synced.clear()
    writer = async_ckpt.FileSystemWriter(ckpt_dir, sync_files=False)
    async_ckpt.save(_small_state(2.0), storage_writer=writer)
    assert synced == []
