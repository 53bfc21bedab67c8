"""What the local backend's writer, reader and root share.

A checkpoint id as a path, the flags files under it are opened with, and
bounded reads of its small files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import CorruptCheckpointError, MetadataError
from .direct import PIECE

# NOFOLLOW: a symlinked file could point outside the checkpoint. NONBLOCK: opening a FIFO
# planted in place of a file must not hang (regular files ignore the flag).
_OPEN_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_OPEN_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)


def _local_path(checkpoint_id: str | os.PathLike) -> Path:
    text = os.fspath(checkpoint_id)
    return Path(text.removeprefix("file://") if text.startswith("file://") else text)


def _read_regular_file(
    path: Path, limit: int, fd: int | None = None, what: str = "checkpoint metadata"
) -> bytes:
    """The bytes of ``path`` (or of ``fd``, opened on it), a regular file of at most ``limit``.

    Type and size are checked on the open descriptor before anything is read; the
    descriptor is closed.
    """
    if fd is None:
        fd = os.open(path, _OPEN_READ)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptCheckpointError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise MetadataError(
                f"invalid {what}: {path} is {info.st_size} bytes, above the {limit} limit"
            )
        chunks = []
        remaining = limit + 1
        while remaining > 0:
            piece = os.read(fd, min(remaining, PIECE))
            if not piece:
                break
            chunks.append(piece)
            remaining -= len(piece)
        return b"".join(chunks)
    finally:
        os.close(fd)
