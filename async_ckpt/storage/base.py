"""The storage protocols every backend implements.

Call order of one save (every rank runs its own writer on the same id):

1. ``prepare(coordinator=...)`` on every rank, before any data is written.
2. ``write_file(name, segments)`` for each data file this rank owns; called
   concurrently from several writer threads (one file per call).
3. On success of every rank: ``commit(metadata)`` on the coordinator only. The
   metadata is written last and atomically; until it exists the checkpoint
   does not exist for readers. Then ``remove_stale(keep)`` on the coordinator.
4. On failure anywhere: ``abort(names)`` on every rank for the files it wrote.

A reader is used from one process; ``read_into`` may be called concurrently.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..format.checksum import block_checksums

# Names of the data files a save creates: <save_id>-r<rank>-<index>.data
DATA_FILE = re.compile(r"^(?P<save_id>[A-Za-z0-9]+)-r(?P<rank>\d+)-(?P<index>\d+)\.data$")


def data_file_name(save_id: str, rank: int, index: int) -> str:
    """The name of a save's data file for ``rank`` (unique per save, so saves never mix)."""
    return f"{save_id}-r{rank}-{index}.data"


@dataclass(frozen=True)
class SegmentRecord:
    """Where one written segment landed in its file, with its block checksums."""

    offset: int
    nbytes: int
    checksums: tuple[int, ...]


def checksummed_layout(
    segments: Sequence[memoryview], block_size: int
) -> tuple[list[SegmentRecord], int]:
    """Offsets and checksums of ``segments`` laid end to end; returns records and total size."""
    records = []
    offset = 0
    for seg in segments:
        records.append(SegmentRecord(offset, seg.nbytes, tuple(block_checksums(seg, block_size))))
        offset += seg.nbytes
    return records, offset


class StorageWriter(ABC):
    """Writes one checkpoint's data files and commits its metadata."""

    checkpoint_id: str
    # False for stores that live inside one process (memory://): a worker
    # process writing there would be invisible to the caller.
    visible_across_processes: bool = True

    @classmethod
    @abstractmethod
    def validate_checkpoint_id(cls, checkpoint_id: str) -> bool:
        """Whether this backend handles ``checkpoint_id`` (used by detection)."""

    @abstractmethod
    def prepare(self, *, coordinator: bool) -> None:
        """Create the checkpoint location; refuse an existing one if told not to overwrite."""

    @abstractmethod
    def write_file(
        self, name: str, segments: Sequence[memoryview], block_size: int
    ) -> list[SegmentRecord]:
        """Write ``segments`` back to back into data file ``name``, durably; thread-safe."""

    @abstractmethod
    def commit(self, metadata: bytes) -> None:
        """Make the checkpoint visible by writing its metadata last, atomically."""

    @abstractmethod
    def remove_stale(self, keep: Iterable[str]) -> list[str]:
        """After commit: delete data files of earlier or failed saves; returns their names."""

    @abstractmethod
    def abort(self, names: Iterable[str]) -> None:
        """Delete data files this rank wrote for a save that will not commit."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or handles; the writer is not used afterwards."""


class StorageReader(ABC):
    """Reads a committed checkpoint's metadata and byte ranges of its data files."""

    checkpoint_id: str

    @classmethod
    @abstractmethod
    def validate_checkpoint_id(cls, checkpoint_id: str) -> bool:
        """Whether this backend handles ``checkpoint_id`` (used by detection)."""

    @abstractmethod
    def read_metadata(self) -> bytes:
        """The committed metadata file's bytes.

        Raises CheckpointNotFoundError when nothing is there and
        IncompleteCheckpointError when data exists without committed metadata.
        """

    @abstractmethod
    def read_into(self, name: str, offset: int, dest: memoryview) -> None:
        """Fill ``dest`` with bytes ``[offset, offset+len(dest))`` of data file ``name``."""

    def file_size(self, name: str) -> int | None:
        """Actual size of data file ``name``, or None where the backend cannot tell cheaply.

        Called before a load allocates buffers, so that sizes a damaged or hostile
        metadata file declares are checked against the real files first.
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files or connections."""
