"""The step directories under a manager root: list, size and delete them.

A manager keeps one checkpoint per step at ``<root>/step-<step:08d>``. A step
is *committed* when its ``metadata.json`` exists (see docs/FORMAT.md); a step
directory without it is what a crashed or failed save left behind. The root
may be anything a storage backend handles (a local path, an fsspec URL, a
plugin's URL): the backend's :class:`~async_ckpt.storage.base.StorageRoot`
does the listing and deleting.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..storage.base import checkpoint_metadata
from ..storage.detect import detect_reader, detect_root

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


@dataclass(frozen=True)
class StepInfo:
    """One step directory: its step, checkpoint id, state, size (bytes) and modification time."""

    step: int
    path: str
    committed: bool
    size: int
    mtime: float | None
    files: dict[tuple[int, int], int] | None = None  # see Usage.files


def disk_bytes(infos: Iterable[StepInfo]) -> int:
    """Bytes the steps take together: a file that several share (hard links) counts once."""
    unique: dict[tuple[int, int], int] = {}
    total = 0
    for info in infos:
        if info.files is None:
            total += info.size
        else:
            unique.update(info.files)
    return total + sum(unique.values())


class StepStore:
    """The step directories under one root, on whichever storage backend handles it.

    Every method may be called from any thread; deletion is left to one rank
    (the manager's rank 0), listing works on all.
    """

    def __init__(
        self, root: str | os.PathLike, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.root = os.fspath(root).rstrip("/") or "/"
        self.storage_options = storage_options
        self.storage = detect_root(self.root, storage_options)

    def checkpoint_id(self, step: int) -> str:
        """The checkpoint id of ``step`` (what save/load are given)."""
        return f"{self.root}/{step_dir_name(step)}"

    def identity(self, step: int) -> str:
        """A name of ``step``'s directory that is equal however the root was spelled."""
        return self.storage.identity(step_dir_name(step))

    def exists(self) -> bool:
        """Whether the root itself exists (a directory, or a non-empty prefix)."""
        return self.storage.exists()

    def scan(self) -> dict[int, bool]:
        """Every step directory under the root: ``{step: committed}``."""
        found: dict[int, bool] = {}
        for name, committed in self.storage.children().items():
            step = parse_step_dir(name)
            if step is not None:
                found[step] = committed
        return found

    def committed(self) -> list[int]:
        """The committed steps, oldest first."""
        return sorted(step for step, done in self.scan().items() if done)

    def info(self, step: int, committed: bool) -> StepInfo:
        """Size (all files) and modification time of ``step``'s directory."""
        usage = self.storage.usage(step_dir_name(step))
        return StepInfo(
            step, self.checkpoint_id(step), committed, usage.size, usage.mtime, usage.files
        )

    def infos(self) -> list[StepInfo]:
        """:class:`StepInfo` of every step directory, oldest step first."""
        return [self.info(step, done) for step, done in sorted(self.scan().items())]

    def extra(self, step: int) -> dict[str, Any]:
        """The ``extra`` field of ``step``'s committed metadata (decoded and checksum-verified).

        Raises :class:`~async_ckpt.errors.CheckpointError` when the metadata is
        missing or damaged.
        """
        reader = detect_reader(self.checkpoint_id(step), self.storage_options)
        try:
            meta = checkpoint_metadata(reader)
        finally:
            reader.close()
        return meta.extra

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics ``step`` was saved with (``extra["metrics"]``), None if it has none."""
        metrics = self.extra(step).get("metrics")
        return metrics if isinstance(metrics, dict) else None

    def remove(self, step: int) -> None:
        """Delete ``step``'s directory; its metadata goes first, so a crash midway
        leaves an incomplete directory (cleaned up later), never a committed
        checkpoint with missing data files."""
        self.storage.delete(step_dir_name(step))
