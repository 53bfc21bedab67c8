"""Storage writers that misbehave on purpose, for the executor tests.

The worker process must unpickle them, so they live in a plain module: the
tests put this directory on ``sys.path`` and the worker inherits the caller's
import path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from async_ckpt import FileSystemWriter
from async_ckpt.storage.base import SegmentRecord

GATE_LIMIT_S = 120.0  # a gate nobody opens fails the write rather than hanging forever


class GatedWriter(FileSystemWriter):
    """Announces each data-file write (``<gate>/started``), then waits for ``<gate>/open``.

    Lets a test act while a write is certainly in flight, without timing guesses.
    """

    def __init__(self, checkpoint_id: str | os.PathLike, *, gate: str | os.PathLike) -> None:
        super().__init__(checkpoint_id, sync_files=False)
        self.gate = os.fspath(gate)

    def write_file(
        self, name: str, segments: Sequence[memoryview], block_size: int
    ) -> list[SegmentRecord]:
        Path(self.gate, "started").touch()
        deadline = time.monotonic() + GATE_LIMIT_S
        while not Path(self.gate, "open").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {self.gate} was never opened")
            time.sleep(0.005)
        return super().write_file(name, segments, block_size)


class FailingWriter(FileSystemWriter):
    """Every data-file write fails with ``OSError("disk on fire")``."""

    def __init__(self, checkpoint_id: str | os.PathLike) -> None:
        super().__init__(checkpoint_id, sync_files=False)

    def write_file(
        self, name: str, segments: Sequence[memoryview], block_size: int
    ) -> list[SegmentRecord]:
        raise OSError("disk on fire")
