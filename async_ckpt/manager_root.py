"""The step directories under a manager root: list, size and delete them.

A manager keeps one checkpoint per step at ``<root>/step-<step:08d>``. A step
is *committed* when its ``metadata.json`` exists (see docs/FORMAT.md); a step
directory without it is what a crashed or failed save left behind. The root
may be a local path (``os`` calls) or any fsspec URL (``s3://``, ``memory://``).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass

from .format.names import METADATA_FILE
from .storage.fsspec_backend import modified_time, open_filesystem

STEP_DIR = re.compile(r"^step-(?P<step>\d{8,})$")


def step_dir_name(step: int) -> str:
    """The directory name of ``step`` (``step-00000100``)."""
    return f"step-{step:08d}"


def parse_step_dir(name: str) -> int | None:
    """The step a directory name stands for; None unless it is exactly ``step_dir_name(step)``."""
    match = STEP_DIR.match(name)
    if match is None or step_dir_name(int(match["step"])) != name:
        return None
    return int(match["step"])


def is_local(root: str) -> bool:
    """Whether ``root`` is a local path (what the local storage backend accepts)."""
    return root.startswith("file://") or "://" not in root


@dataclass(frozen=True)
class StepInfo:
    """One step directory: its step, checkpoint id, state, size (bytes) and modification time."""

    step: int
    path: str
    committed: bool
    size: int
    mtime: float | None


class StepStore:
    """The step directories under one root, on the local disk or an fsspec filesystem.

    Every method may be called from any thread; deletion is left to one rank
    (the manager's rank 0), listing works on all.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.fspath(root).rstrip("/") or "/"
        self.local = is_local(self.root)
        if self.local:
            self._dir = self.root.removeprefix("file://")
            self.fs, self._fs_root = None, ""
        else:
            self._dir = ""
            self.fs, self._fs_root = open_filesystem(self.root, None)

    def checkpoint_id(self, step: int) -> str:
        """The checkpoint id of ``step`` (what save/load are given)."""
        return f"{self.root}/{step_dir_name(step)}"

    def identity(self, step: int) -> str:
        """A name of ``step``'s directory that is equal however the root was spelled."""
        if self.local:
            return os.path.realpath(self._native(step))
        return f"{self.fs.protocol}:{self._native(step)}"

    def _native(self, step: int) -> str:
        """Where ``step`` lives for ``os`` or the fsspec filesystem."""
        if self.local:
            return os.path.join(self._dir, step_dir_name(step))
        return f"{self._fs_root}/{step_dir_name(step)}"

    def exists(self) -> bool:
        """Whether the root itself exists (a directory, or a non-empty prefix)."""
        if self.local:
            return os.path.isdir(self._dir)
        return bool(self.fs.exists(self._fs_root))

    def scan(self) -> dict[int, bool]:
        """Every step directory under the root: ``{step: committed}``."""
        found: dict[int, bool] = {}
        if self.local:
            try:
                entries = list(os.scandir(self._dir))
            except FileNotFoundError:
                return {}
            for entry in entries:
                step = parse_step_dir(entry.name)
                if step is not None and entry.is_dir(follow_symlinks=False):
                    found[step] = os.path.isfile(os.path.join(entry.path, METADATA_FILE))
            return found
        self.fs.invalidate_cache(self._fs_root)  # other ranks and processes change it
        try:
            listing = self.fs.ls(self._fs_root, detail=True)
        except FileNotFoundError:
            return {}
        for item in listing:
            step = parse_step_dir(item["name"].rstrip("/").rsplit("/", 1)[-1])
            if step is not None and item.get("type") == "directory":
                found[step] = False
        for meta in self.fs.glob(f"{self._fs_root}/step-*/{METADATA_FILE}"):
            step = parse_step_dir(meta.rstrip("/").rsplit("/", 2)[-2])
            if step is not None:
                found[step] = True
        return found

    def committed(self) -> list[int]:
        """The committed steps, oldest first."""
        return sorted(step for step, done in self.scan().items() if done)

    def info(self, step: int, committed: bool) -> StepInfo:
        """Size (all files) and modification time of ``step``'s directory."""
        path = self._native(step)
        size, newest = 0, None
        if self.local:
            for folder, _, names in os.walk(path):
                for name in names:
                    try:
                        st = os.stat(os.path.join(folder, name), follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    size += st.st_size
                    newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
            if newest is None and os.path.isdir(path):
                newest = os.stat(path).st_mtime
        else:
            for info in self.fs.find(path, detail=True).values():
                size += int(info.get("size") or 0)
                stamp = modified_time(info)
                if stamp is not None:
                    newest = stamp if newest is None else max(newest, stamp)
        return StepInfo(step, self.checkpoint_id(step), committed, size, newest)

    def infos(self) -> list[StepInfo]:
        """:class:`StepInfo` of every step directory, oldest step first."""
        return [self.info(step, done) for step, done in sorted(self.scan().items())]

    def remove(self, step: int) -> None:
        """Delete ``step``'s directory; its metadata goes first, so a crash midway
        leaves an incomplete directory (cleaned up later), never a committed
        checkpoint with missing data files."""
        path = self._native(step)
        if self.local:
            try:
                os.unlink(os.path.join(path, METADATA_FILE))
            except FileNotFoundError:
                pass
            shutil.rmtree(path, ignore_errors=True)
            return
        try:
            self.fs.rm_file(f"{path}/{METADATA_FILE}")
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
