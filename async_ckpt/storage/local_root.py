"""The checkpoint directories under a local directory: :class:`FileSystemRoot`."""

from __future__ import annotations

import os
import shutil

from ..format.names import METADATA_FILE
from .base import StorageRoot, Usage
from .local_paths import _local_path


class FileSystemRoot(StorageRoot):
    """The checkpoint directories under a local directory (a CheckpointManager root)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.fspath(root)
        self.path = _local_path(root)

    def exists(self) -> bool:
        return self.path.is_dir()

    def children(self) -> dict[str, bool]:
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return {}
        return {
            entry.name: os.path.isfile(os.path.join(entry.path, METADATA_FILE))
            for entry in entries
            if entry.is_dir(follow_symlinks=False)
        }

    def usage(self, name: str) -> Usage:
        path = self.path / name
        size, newest, files = 0, None, {}
        for folder, _, names in os.walk(path):
            for file in names:
                try:
                    st = os.stat(os.path.join(folder, file), follow_symlinks=False)
                except FileNotFoundError:
                    continue
                size += st.st_size
                files[(st.st_dev, st.st_ino)] = st.st_size
                newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
        if newest is None and path.is_dir():
            newest = os.stat(path).st_mtime
        return Usage(size, newest, files)

    def delete(self, name: str) -> None:
        path = self.path / name
        try:
            os.unlink(path / METADATA_FILE)
        except FileNotFoundError:
            pass
        # Errors below the metadata are left: the child lists as incomplete, and the
        # caller sees it is still there.
        shutil.rmtree(path, ignore_errors=True)

    def identity(self, name: str) -> str:
        return os.path.realpath(self.path / name)
