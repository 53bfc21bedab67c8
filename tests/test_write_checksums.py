"""A save checksums each data file while the file is written, not before.

Checksumming first left the disk idle for the CRC pass of every file
(docs/performance.md). These tests synchronise on events: the checksum of a
file waits until that file's write has started, which deadlocks (and times
out) if the checksums still came first.
"""

from __future__ import annotations

import threading

import pytest
import torch

import async_ckpt as ac
from async_ckpt.format import checksum as checksum_mod
from async_ckpt.pipeline import write as write_mod
from async_ckpt.pipeline.write import write_rank_files
from async_ckpt.storage.local import FileSystemWriter

WAIT_S = 30.0  # generous: the suite must pass on a busy machine


class _WatchedWriter(FileSystemWriter):
    """A local writer that reports each file's write starting, and may fail it."""

    def __init__(self, path, fail: bool = False) -> None:
        super().__init__(path)
        self.started = threading.Event()
        self.fail = fail

    def write_file(self, name, segments):
        self.started.set()
        if self.fail:
            raise OSError(5, "injected write failure")
        super().write_file(name, segments)


def _segments(count: int = 3) -> list[memoryview]:
    return [memoryview(torch.full((1024,), float(i)).numpy()).cast("B") for i in range(count)]


def test_checksums_run_while_the_file_is_written(tmp_path, monkeypatch):
    writer = _WatchedWriter(tmp_path / "ckpt")
    writer.prepare(coordinator=True)
    real = write_mod.block_checksums
    waited: list[bool] = []

    def after_the_write_started(data, block_size):
        waited.append(writer.started.wait(WAIT_S))
        return real(data, block_size)

    monkeypatch.setattr(write_mod, "block_checksums", after_the_write_started)
    segments = _segments()
    placed = write_rank_files(writer, segments, 0, "s", 1, 4096, {})
    assert waited and all(waited), "the checksums ran before the file's write started"
    for n, seg in enumerate(segments):
        name, record = placed[n]
        assert record.checksums == tuple(checksum_mod.block_checksums(seg, 4096))


def test_a_failed_write_returns_only_after_its_checksums_stopped(tmp_path, monkeypatch):
    """The buffers may be handed back once the write fails: no thread may still read them."""
    writer = _WatchedWriter(tmp_path / "ckpt", fail=True)
    writer.prepare(coordinator=True)
    monkeypatch.setenv("ASYNC_CKPT_WRITE_ATTEMPTS", "1")
    real = write_mod.block_checksums
    checksumming = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    def slow(data, block_size):
        checksumming.set()
        release.wait(WAIT_S)
        try:
            return real(data, block_size)
        finally:
            finished.set()

    monkeypatch.setattr(write_mod, "block_checksums", slow)
    outcome: list[BaseException] = []

    def save() -> None:
        try:
            write_rank_files(writer, _segments(1), 0, "s", 1, 4096, {})
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=save)
    thread.start()
    assert checksumming.wait(WAIT_S) and writer.started.wait(WAIT_S)
    thread.join(0.2)  # the write has failed by now or soon; the return must still wait
    assert thread.is_alive() and not finished.is_set()
    release.set()
    thread.join(WAIT_S)
    assert not thread.is_alive() and finished.is_set()
    assert outcome and "injected write failure" in str(outcome[0])


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_checkpoints_still_verify(tmp_path, executor):
    """End to end: what is committed with overlapped checksums loads with them verified,
    and a flipped byte is still caught."""
    state = {f"w{i}": torch.randn(300, 70) for i in range(9)}
    with ac.AsyncCheckpointer(executor=executor, no_dist=True) as ck:
        ck.save(state, checkpoint_id=tmp_path / "c").result()
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    ac.load(target, checkpoint_id=tmp_path / "c", no_dist=True)
    assert all(torch.equal(target[k], state[k]) for k in state)
    data = sorted(p for p in (tmp_path / "c").iterdir() if p.suffix == ".data")[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ac.CheckpointError, match="checksum mismatch"):
        ac.load(target, checkpoint_id=tmp_path / "c", no_dist=True)


def test_a_file_written_before_its_checksums_failed_is_left_to_the_caller(tmp_path, monkeypatch):
    """The caller deletes the files it is told of after a failure: a written file is one."""
    writer = FileSystemWriter(tmp_path / "ckpt")
    writer.prepare(coordinator=True)

    def broken(data, block_size):
        raise MemoryError("injected checksum failure")

    monkeypatch.setattr(write_mod, "block_checksums", broken)
    files: dict[str, int] = {}
    with pytest.raises(MemoryError, match="injected"):
        write_rank_files(writer, _segments(2), 0, "s", 1, 4096, files)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == list(files)
