"""Direct I/O writes: big page-aligned segments bypass the page cache, bytes stay exact."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import async_ckpt
from async_ckpt.staging.arena import PAGE, Arena
from async_ckpt.staging.layout import plan_layout
from async_ckpt.state.model import TensorItem
from async_ckpt.storage import direct
from async_ckpt.storage.direct import DIRECT_MIN_BYTES, DirectWrites
from async_ckpt.storage.local import FileSystemWriter
from async_ckpt.tools.verify import verify_checkpoint


def _direct_supported(path) -> bool:
    probe = path / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def _segments(arena: Arena) -> list[memoryview]:
    """A page-aligned big segment, a small one, an odd-sized big one, a float view."""
    data = memoryview(arena.bytes.numpy())
    data[:] = bytes(range(256)) * (len(data) // 256)
    big = 2 * DIRECT_MIN_BYTES
    floats = torch.arange(DIRECT_MIN_BYTES // 2, dtype=torch.float32)  # 512 KiB, 'f' format
    return [
        data[:big],
        data[big : big + 100],
        data[2 * big : 3 * big + 123],
        memoryview(floats.numpy()),
    ]


def _write(tmp_path, writes: DirectWrites, segments: list[memoryview]) -> bytes:
    path = tmp_path / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writes.write_segments(fd, path, segments)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path.read_bytes()


def _expected(segments: list[memoryview]) -> bytes:
    return b"".join(direct.byte_view(s).tobytes() for s in segments)


def test_direct_and_buffered_segments_land_byte_exact(tmp_path):
    arena = Arena(4 * DIRECT_MIN_BYTES + 8 * PAGE)
    segments = _segments(arena)
    writes = DirectWrites(True)
    assert _write(tmp_path, writes, segments) == _expected(segments)
    if _direct_supported(tmp_path):
        # The page-aligned head of the first segment went direct; the small one
        # after it breaks the file offset's alignment, so the rest went buffered.
        assert writes.direct_bytes == 2 * DIRECT_MIN_BYTES
        assert writes.enabled
    else:
        assert writes.direct_bytes == 0 and not writes.enabled


def test_disabled_writes_everything_buffered(tmp_path):
    segments = _segments(Arena(4 * DIRECT_MIN_BYTES + 8 * PAGE))
    writes = DirectWrites(False)
    assert _write(tmp_path, writes, segments) == _expected(segments)
    assert writes.direct_bytes == 0


def test_a_file_system_that_refuses_o_direct_at_open_falls_back(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct.os, "open", refusing_open)
    segments = _segments(Arena(4 * DIRECT_MIN_BYTES + 8 * PAGE))
    writes = DirectWrites(True)
    assert _write(tmp_path, writes, segments) == _expected(segments)
    assert not writes.enabled and writes.direct_bytes == 0


def test_a_refused_direct_write_is_rewritten_buffered(tmp_path, monkeypatch):
    if not _direct_supported(tmp_path):
        pytest.skip("this file system has no O_DIRECT: the open-time fallback covers it")
    real = direct.pwrite_all
    calls = []

    def refuse_first(fd, view, offset):
        calls.append(offset)
        if len(calls) == 1:  # the first segment's direct write
            os.pwrite(fd, bytes(view[:PAGE]), offset)  # part got through, then EINVAL
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, view, offset)

    monkeypatch.setattr(direct, "pwrite_all", refuse_first)
    segments = _segments(Arena(4 * DIRECT_MIN_BYTES + 8 * PAGE))
    writes = DirectWrites(True)
    assert _write(tmp_path, writes, segments) == _expected(segments)
    assert not writes.enabled and writes.direct_bytes == 0


def test_other_write_errors_are_not_swallowed(tmp_path, monkeypatch):
    def full_disk(fd, view, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct, "pwrite_all", full_disk)
    with pytest.raises(OSError) as info:
        _write(tmp_path, DirectWrites(True), _segments(Arena(4 * DIRECT_MIN_BYTES + 8 * PAGE)))
    assert info.value.errno == errno.ENOSPC


def test_big_tensors_start_on_a_page_in_the_arena():
    sizes = [100, DIRECT_MIN_BYTES, 12, DIRECT_MIN_BYTES + 4]
    items = [
        TensorItem(
            key=f"t{i}", path=(f"t{i}",), dtype="uint8", shape=(n,), offsets=(0,), sizes=(n,)
        )
        for i, n in enumerate(sizes)
    ]
    tensors = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    ((indices, offsets),) = plan_layout(items, tensors).waves
    assert offsets[1] % PAGE == 0 and offsets[3] % PAGE == 0
    assert offsets[0] == 0 and offsets[2] == offsets[1] + DIRECT_MIN_BYTES  # small: packed


def test_a_save_goes_direct_and_loads_bit_exact(tmp_path):
    if not _direct_supported(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    torch.manual_seed(0)
    state = {
        "w": torch.randn(512, 1024),  # 2 MiB
        "b": torch.randn(1000),  # small, odd size
        "e": torch.randn(333, 777),  # big, not a page multiple
        "step": 7,
    }
    assert not FileSystemWriter(tmp_path / "other").direct.enabled  # opt-in
    writer = FileSystemWriter(tmp_path / "ckpt", direct_io=True)
    # Staged into the arena (page-aligned slots), written in this process.
    with async_ckpt.AsyncCheckpointer(executor="thread", no_dist=True) as checkpointer:
        checkpointer.save(state, storage_writer=writer).result()
    assert writer.direct.direct_bytes >= 512 * 1024 * 4
    target = {"w": torch.zeros(512, 1024), "b": torch.zeros(1000), "e": torch.zeros(333, 777)}
    target["step"] = 0
    async_ckpt.load(target, checkpoint_id=tmp_path / "ckpt")
    for key in ("w", "b", "e"):
        assert torch.equal(target[key], state[key])
    assert target["step"] == 7
    assert verify_checkpoint(tmp_path / "ckpt").problems == []


@pytest.mark.parametrize("short_by", [0, 1, 700])
def test_gathered_writes_land_every_byte_in_place_even_after_a_short_write(
    tmp_path, monkeypatch, short_by
):
    """pwrite_views: many small views per pwritev; a short count finishes view by view."""
    views = [memoryview(bytes([i % 251]) * (1 + i % 97)) for i in range(3000)]
    real = os.pwritev
    calls = []

    def pwritev(fd, buffers, offset):
        calls.append(len(buffers))
        total = sum(len(b) for b in buffers)
        if short_by and len(calls) == 1:  # the first call stops short, mid-view
            whole = bytearray(b"".join(buffers))[: total - short_by]
            return os.pwrite(fd, whole, offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(direct.os, "pwritev", pwritev)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        direct.pwrite_views(fd, views, 5)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 5 + b"".join(views)
    assert len(calls) == 3  # 3000 views: 1024 per call at most
