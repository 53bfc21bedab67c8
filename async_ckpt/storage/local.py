"""Local filesystem backend: a checkpoint is a directory; metadata.json commits it.

Handles plain paths and ``file://`` URLs. This module holds the writer; the
reader is in :mod:`.local_reader`, the root in :mod:`.local_root`, and both are
importable from here.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointExistsError, CorruptCheckpointError
from ..format.decode import MAX_METADATA_BYTES
from ..format.names import DATA_FILE, METADATA_FILE, METADATA_TEMP_PREFIX, is_safe_file_name
from .base import StorageWriter
from .dcp_options import _NOT_SET, checkpoint_id_or_path, warn_ignored
from .direct import DirectWrites, pwrite_all
from .local_paths import _OPEN_WRITE, _local_path, _read_regular_file
from .local_reader import FileSystemReader
from .local_root import FileSystemRoot


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSystemWriter(StorageWriter):
    """Writes a checkpoint directory with large sequential writes from tensor memory.

    ``overwrite=True`` replaces an existing checkpoint atomically (its metadata
    is swapped by rename, then its old data files are deleted); ``False``
    refuses with :class:`CheckpointExistsError`. ``sync_files`` fsyncs each data
    file, the metadata and the directory, so a committed checkpoint survives a
    power loss. ``direct_io=True`` (or ``ASYNC_CKPT_DIRECT_IO=1`` for the default)
    writes big page-aligned segments with ``O_DIRECT``, sparing the training
    process's cores the page-cache copy (:mod:`.direct`); off by default.
    """

    can_share_files = True

    def __init__(
        self,
        checkpoint_id: str | os.PathLike | None = None,
        single_file_per_rank: Any = _NOT_SET,
        sync_files: bool = True,
        thread_count: int | None = None,
        per_thread_copy_ahead: Any = _NOT_SET,
        overwrite: bool = True,
        *,
        path: str | os.PathLike | None = None,
        cache_staged_state_dict: Any = _NOT_SET,
        serialization_format: Any = _NOT_SET,
        _extensions: Any = _NOT_SET,
        direct_io: bool | None = None,
    ) -> None:
        # Positions and names as in torch.distributed.checkpoint's FileSystemWriter, so a
        # DCP call works unchanged; its options that mean nothing here warn (dcp_options).
        checkpoint_id = checkpoint_id_or_path(checkpoint_id, path)
        warn_ignored(
            single_file_per_rank=single_file_per_rank,
            per_thread_copy_ahead=per_thread_copy_ahead,
            cache_staged_state_dict=cache_staged_state_dict,
            serialization_format=serialization_format,
            _extensions=_extensions,
        )
        self.checkpoint_id = os.fspath(checkpoint_id)
        self.path = _local_path(checkpoint_id)
        self.overwrite = overwrite
        self.sync_files = sync_files
        self.thread_count = thread_count
        if direct_io is None:  # off by default: see docs/storage-backends.md for the trade-off
            direct_io = os.environ.get("ASYNC_CKPT_DIRECT_IO", "0").strip() in ("1", "true")
        self.direct = DirectWrites(direct_io)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        text = os.fspath(checkpoint_id)
        return text.startswith("file://") or "://" not in text

    def prepare(self, *, coordinator: bool) -> None:
        if coordinator and not self.overwrite and (self.path / METADATA_FILE).exists():
            raise CheckpointExistsError(
                f"Checkpoint already exists: {self.checkpoint_id!r} holds a committed checkpoint "
                "and the writer has overwrite=False; pass overwrite=True to the "
                "writer to replace it, or save under a new checkpoint_id"
            )
        self.path.mkdir(parents=True, exist_ok=True)

    def write_file(self, name: str, segments: Sequence[memoryview]) -> None:
        path = self.path / name
        fd = os.open(path, _OPEN_WRITE, 0o644)
        try:
            self.direct.write_segments(fd, path, segments)
            if self.sync_files:
                os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self, metadata: bytes) -> bytes | None:
        # A name no other writer (thread, process, host) uses, so that concurrent
        # commits to one id never rename or delete each other's temporary file.
        tmp = self.path / f"{METADATA_TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        # The directory's lock makes reading what is replaced and replacing it one step
        # for writers on this host (a lock on the directory itself: no extra file).
        lock = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:  # ENOLCK and the like (some network file systems): go unlocked,
                pass  # a racing commit's files are then left to sweep_orphans
            return self._commit_locked(metadata, tmp)
        finally:
            os.close(lock)  # releases the lock

    def _commit_locked(self, metadata: bytes, tmp: Path) -> bytes | None:
        previous = self.committed_metadata()
        try:
            fd = os.open(tmp, _OPEN_WRITE | os.O_EXCL, 0o644)
            try:
                pwrite_all(fd, memoryview(metadata), 0)
                if self.sync_files:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if self.sync_files:
                _fsync_dir(self.path)  # data file entries are durable before the commit is
            os.replace(tmp, self.path / METADATA_FILE)
        except BaseException:
            _unlink_quietly(tmp)  # a partial file would keep holding the space (ENOSPC)
            raise
        if self.sync_files:
            _fsync_dir(self.path)
        return previous

    def base_metadata(self, base: str) -> bytes | None:
        try:
            return _read_regular_file(_local_path(base) / METADATA_FILE, MAX_METADATA_BYTES)
        except FileNotFoundError:
            return None

    def share_file(self, base: str, name: str, target: str, size: int) -> bool:
        # A hard link: the bytes stay until the last checkpoint listing them is
        # deleted (rm -r included). Nothing ever opens a data file for writing
        # once written, so the shared inode never changes.
        if not (is_safe_file_name(name) and is_safe_file_name(target)):
            return False
        source, link = _local_path(base) / name, self.path / target
        try:
            os.link(source, link, follow_symlinks=False)
        except OSError:  # the base is gone, another file system, no hard links here
            return False
        if _is_file_of_size(link, size):
            # A link keeps the file's old mtime, and ages decide what is a dead save's
            # leftover (sweep_orphans, incomplete steps): this save's file is new now.
            # (The inode is the base's too: its file looks as recent, which only
            # makes age-based clean-up of the base more cautious.)
            try:
                os.utime(link)
            except OSError:
                pass
            return True
        _unlink_quietly(link)  # truncated or replaced: not something to commit
        return False

    def committed_metadata(self) -> bytes | None:
        try:
            return _read_regular_file(self.path / METADATA_FILE, MAX_METADATA_BYTES)
        except (OSError, CorruptCheckpointError):
            return None

    def missing_files(self, names: Iterable[str]) -> list[str]:
        return [name for name in names if not (self.path / name).is_file()]

    def remove_files(self, names: Iterable[str]) -> list[str]:
        return [name for name in names if _unlink_quietly(self.path / name)]

    def sweep_orphans(self, keep: Iterable[str], older_than_s: float) -> list[str]:
        keep = set(keep)
        cutoff = time.time() - older_than_s
        newest: dict[str, float] = {}  # save_id -> newest mtime of its files
        groups: dict[str, list[str]] = {}
        temporaries = []
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return []
        for entry in entries:
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            match = DATA_FILE.match(entry.name)
            if match and entry.name not in keep:
                save_id = match["save_id"]
                groups.setdefault(save_id, []).append(entry.name)
                newest[save_id] = max(newest.get(save_id, 0.0), mtime)
            elif entry.name.startswith(METADATA_TEMP_PREFIX) and mtime < cutoff:
                temporaries.append(entry.name)
        old = [name for sid, names in groups.items() if newest[sid] < cutoff for name in names]
        return self.remove_files(old + temporaries)

    def abort(self, names: Iterable[str]) -> None:
        for name in names:
            _unlink_quietly(self.path / name)


def _is_file_of_size(path: Path, size: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _unlink_quietly(path: Path) -> bool:
    """Delete ``path``; False if it was gone already."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


__all__ = ["FileSystemReader", "FileSystemRoot", "FileSystemWriter"]
