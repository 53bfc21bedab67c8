"""Storage writers that fail on purpose; importable by worker processes."""

from __future__ import annotations

import os
import time

from async_ckpt.storage.local import FileSystemWriter


class FailingWriter(FileSystemWriter):
    """Raises from write_file on the ranks listed (all when empty)."""

    def __init__(
        self, checkpoint_id: str, *, fail_ranks: tuple[int, ...] = (), message: str = "disk on fire"
    ) -> None:
        super().__init__(checkpoint_id)
        self.fail_ranks = fail_ranks
        self.message = message

    def write_file(self, name, segments, block_size):
        rank = int(name.split("-r")[1].split("-")[0])
        if not self.fail_ranks or rank in self.fail_ranks:
            raise OSError(f"{self.message} (rank {rank})")
        return super().write_file(name, segments, block_size)


class SlowWriter(FileSystemWriter):
    """Sleeps before each data file, so a test can act while a save is in flight."""

    def __init__(self, checkpoint_id: str, *, delay_s: float = 1.0) -> None:
        super().__init__(checkpoint_id)
        self.delay_s = delay_s

    def write_file(self, name, segments, block_size):
        time.sleep(self.delay_s)
        return super().write_file(name, segments, block_size)


def tests_on_worker_path() -> None:
    """Let worker processes import this module (they inherit PYTHONPATH)."""
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
