"""The storage protocols every backend implements.

Call order of one save (every rank runs its own writer on the same id):

1. ``prepare(coordinator=...)`` on every rank, before any data is written.
2. ``write_file(name, segments)`` for each data file this rank owns; called
   concurrently from several writer threads (one file per call).
3. On success of every rank, on the coordinator only (``pipeline/commit.py``):
   ``missing_files`` (a pre-commit check that the save's own files are all
   there), ``commit(metadata)`` (written last and atomically; until it exists
   the checkpoint does not exist for readers; returns the metadata it
   replaced), then ``remove_files`` for the data files of the metadata it
   replaced, and ``sweep_orphans`` for leftovers of dead saves old enough that
   no live writer can own them.
4. On failure anywhere: ``abort(names)`` on every rank for the files it wrote.

A writer deletes only bytes it owns: its own files, the files of the metadata
it replaced, and files no writer has touched for ``sweep_orphans``' grace.
Another writer's files in progress are never deleted (docs/reliability.md).

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
    # How many data files a rank writes in parallel; None: the pipeline's default.
    thread_count: int | None = None

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
    def commit(self, metadata: bytes) -> bytes | None:
        """Make the checkpoint visible by writing its metadata last, atomically.

        Returns the metadata it replaced (None: there was none, or the backend
        cannot tell), read together with the swap where the backend can (a lock
        on the directory locally), so that exactly that checkpoint's files are
        deleted afterwards. Use ``committed_metadata`` to read it.
        """

    @abstractmethod
    def abort(self, names: Iterable[str]) -> None:
        """Delete data files this rank wrote for a save that will not commit."""

    def committed_metadata(self) -> bytes | None:
        """The metadata now committed at this id (None: none, or the backend cannot tell).

        A backend that cannot tell never deletes a replaced checkpoint's files;
        ``sweep_orphans`` does, once they are old.
        """
        return None

    def missing_files(self, names: Iterable[str]) -> list[str]:
        """Which of ``names`` are not in storage now (pre-commit check; [] if unknown)."""
        return []

    def remove_files(self, names: Iterable[str]) -> list[str]:
        """Delete data files by name, ignoring those already gone; returns those deleted."""
        names = list(names)
        self.abort(names)
        return names

    def sweep_orphans(self, keep: Iterable[str], older_than_s: float) -> list[str]:
        """Delete leftovers no live writer can own; returns their names.

        Those are data files outside ``keep`` whose save (all files sharing its
        ``save_id``) has not been written to for ``older_than_s`` seconds, and
        temporary metadata files as old. The default sweeps nothing.
        """
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or handles; the writer is not used afterwards."""


class StorageReader(ABC):
    """Reads a committed checkpoint's metadata and byte ranges of its data files."""

    checkpoint_id: str
    # True for stores that charge per request (object stores): a load fetches
    # back-to-back chunks of one file in one read.
    coalesce_reads: bool = False

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
