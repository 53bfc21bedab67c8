"""Writing a file's segments with ``O_DIRECT`` where their memory allows it.

A buffered ``write`` copies every byte into the page cache first: about 1 ms
of kernel CPU per MiB on the development machine, taken from the cores that
train (measured: 95-135 ms of system time per 96 MiB buffered, 12-13 ms with
``O_DIRECT``, for the same wall time). With ``O_DIRECT`` the disk reads the
bytes straight from the staging arena, which places big tensors on page
boundaries for this (``staging.arena.slot_start``).

A segment goes direct when its memory address and its file offset are both
page-aligned and it is at least :data:`DIRECT_MIN_BYTES`; the page-multiple
part is written direct and the rest, with every other segment, buffered, at
explicit offsets through a second descriptor. The file system may refuse
``O_DIRECT`` (``EINVAL``: tmpfs on older kernels, some network file systems);
then the segment is written buffered and :class:`DirectWrites` stops trying.
The caller's ``fsync`` makes both kinds durable.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DIRECT_ALIGNMENT = 4096  # a multiple of every common logical block size
DIRECT_MIN_BYTES = 256 * 1024  # smaller pieces are not worth a second descriptor
PIECE = 64 * 1024 * 1024  # bounded syscalls: a read or write caps near 2 GiB
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)
_OPEN_DIRECT = os.O_WRONLY | getattr(os, "O_DIRECT", 0) | getattr(os, "O_NOFOLLOW", 0)


def byte_view(segment: memoryview) -> memoryview:
    return segment.cast("B") if segment.format != "B" or segment.ndim != 1 else segment


def address(view: memoryview) -> int:
    """The memory address of a (possibly read-only) buffer, without copying it."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(view):
        pos += os.pwrite(fd, view[pos : pos + PIECE], offset + pos)


# iovecs per pwritev call: the kernel's limit (1024 on Linux)
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


def pwrite_views(fd: int, views: Sequence[memoryview], offset: int) -> None:
    """Write ``views`` end to end from ``offset``: small ones gathered into one
    ``pwritev`` per batch (a state of 100k small tensors: 100 calls, not 100k)."""
    i = 0
    while i < len(views):
        batch: list[memoryview] = []
        size = 0
        while i < len(views) and len(batch) < _IOV_MAX and size + len(views[i]) <= PIECE:
            batch.append(views[i])
            size += len(views[i])
            i += 1
        if not batch:  # one view above PIECE: written in pieces
            pwrite_all(fd, views[i], offset)
            offset += len(views[i])
            i += 1
            continue
        done = os.pwritev(fd, batch, offset) if hasattr(os, "pwritev") else 0
        for view in batch:  # a short write: finish the rest view by view
            if done >= len(view):
                done -= len(view)
            else:
                pwrite_all(fd, view[done:], offset + done)
                done = 0
            offset += len(view)


class DirectWrites:
    """Whether to try ``O_DIRECT``; turns itself off after the file system refuses it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and hasattr(os, "O_DIRECT")
        self.direct_bytes = 0  # written direct since created (for tests and stats)
        self._lock = threading.Lock()  # files are written from several threads

    def __getstate__(self) -> dict:  # travels to the worker inside its storage writer
        return {"enabled": self.enabled, "direct_bytes": self.direct_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def write_segments(self, fd: int, path: Path, segments: Sequence[memoryview]) -> None:
        """Write ``segments`` end to end from offset 0 of the file open as ``fd``."""
        views = [byte_view(s) for s in segments]
        # A second descriptor only when some segment could use it.
        big = any(len(v) >= DIRECT_MIN_BYTES for v in views)
        direct_fd = self._open(path) if self.enabled and big else None
        try:
            offset = 0
            buffered: list[memoryview] = []  # consecutive in the file, from buffered_at
            buffered_at = 0
            for view in views:
                done = 0
                if direct_fd is not None and self._eligible(view, offset):
                    pwrite_views(fd, buffered, buffered_at)
                    buffered = []
                    head = len(view) - len(view) % DIRECT_ALIGNMENT
                    done = self._write_direct(direct_fd, view[:head], offset)
                    if not self.enabled:
                        os.close(direct_fd)
                        direct_fd = None
                if not buffered:
                    buffered_at = offset + done
                buffered.append(view[done:])
                offset += len(view)
            pwrite_views(fd, buffered, buffered_at)
        finally:
            if direct_fd is not None:
                os.close(direct_fd)

    def _eligible(self, view: memoryview, offset: int) -> bool:
        return (
            self.enabled
            and len(view) >= DIRECT_MIN_BYTES
            and offset % DIRECT_ALIGNMENT == 0
            and address(view) % DIRECT_ALIGNMENT == 0
        )

    def _open(self, path: Path) -> int | None:
        try:
            return os.open(path, _OPEN_DIRECT)
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            self.enabled = False
            return None

    def _write_direct(self, fd: int, view: memoryview, offset: int) -> int:
        """Bytes written direct: all of ``view``, or 0 once the file system refuses."""
        try:
            pwrite_all(fd, view, offset)
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            self.enabled = False
            return 0  # the caller writes it all buffered, over whatever got through
        with self._lock:
            self.direct_bytes += len(view)
        return len(view)
