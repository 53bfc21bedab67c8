"""The storage contract every backend implements: a writer, a reader, and a root.

Call order of one save (every rank runs its own writer on the same id):

1. ``prepare(coordinator=...)`` on every rank, before any data is written.
2. ``write_file(name, segments)`` for each data file this rank owns; called
   concurrently from several writer threads (one file per call). The pipeline
   checksums the bytes itself; the writer only stores them, durably.
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

A :class:`StorageRoot` lists and deletes the checkpoints under one root, for
``CheckpointManager``. Backends are found by :mod:`.registry`; the contract in
prose, with what each method must guarantee, is docs/storage-backends.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..format.decode import decode_metadata
from ..format.metadata import Metadata


class StorageWriter(ABC):
    """Writes one checkpoint's data files and commits its metadata."""

    checkpoint_id: str

    visible_across_processes: bool = True
    """Capability: whether another process sees what this writer stores. False for
    stores inside one process (``memory://``): the process executor refuses such a
    writer, since its worker's files would be invisible to the caller."""

    can_share_files: bool = False
    """Capability: whether :meth:`share_file` can give a checkpoint its own copy of or
    link to another checkpoint's file (incremental saves write every byte otherwise)."""

    thread_count: int | None = None
    """Capability: how many data files one rank writes in parallel (``write_file``
    calls in flight); None: the pipeline's default."""

    @classmethod
    @abstractmethod
    def validate_checkpoint_id(cls, checkpoint_id: str) -> bool:
        """Whether this backend handles ``checkpoint_id`` (used by detection)."""

    @abstractmethod
    def prepare(self, *, coordinator: bool) -> None:
        """Create the checkpoint location; refuse an existing one if told not to overwrite."""

    @abstractmethod
    def write_file(self, name: str, segments: Sequence[memoryview]) -> None:
        """Store ``segments`` back to back as data file ``name``, durably; thread-safe.

        Replaces a partial file of an earlier attempt under the same name (a
        failed call is retried for transient errors, see ``storage/retry.py``).
        """

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

    def base_metadata(self, base: str) -> bytes | None:
        """The committed metadata of checkpoint ``base`` in this writer's storage.

        Read by an incremental save (``pipeline/incremental.py``). None: no
        committed checkpoint there; the default (a backend that cannot share
        files) reads nothing, so its incremental saves write every byte.
        """
        return None

    def share_file(self, base: str, name: str, target: str, size: int) -> bool:
        """Make data file ``target`` of this checkpoint hold ``base``'s data file ``name``.

        ``target`` is a new name of this save (its own save id), so it never
        exists yet and an abort may delete it like any file the save wrote.
        The result must be this checkpoint's own: a hard link, a reflink or a
        server-side copy, so that deleting ``base`` leaves it intact; never a
        pointer into ``base``. Only a file of exactly ``size`` bytes (what
        ``base``'s metadata records) is shared: a truncated base file must
        not become part of a new commit. False when it cannot be shared (gone,
        another file system, no support; nothing left behind): the caller
        then writes the bytes. The default shares nothing.
        """
        return False

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

    coalesce_reads: bool = False
    """Capability: whether requests are costly (object stores charge per request):
    a load then fetches back-to-back chunks of one file in one ``read_into``."""

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

    def translated_metadata(self) -> Metadata | None:
        """A reader of a foreign format returns the checkpoint in our model; loaders use it
        instead of decoding ``read_metadata()``. None (the default): the checkpoint is ours.

        ``read_into`` then serves the files that model names (see ``storage/dcp.py``).
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files or connections."""


@dataclass(frozen=True)
class Usage:
    """What one checkpoint under a root holds: bytes of all its files, newest change."""

    size: int
    mtime: float | None  # seconds since the epoch; None: the store does not say
    # Where the store can tell: each file's identity (device, inode) and size, so that
    # a file several checkpoints share (incremental saves' hard links) counts once.
    files: dict[tuple[int, int], int] | None = None


class StorageRoot(ABC):
    """The checkpoints directly under one root (a directory, or a URL prefix).

    Each child ``name`` (one path component) is the checkpoint whose id is
    ``f"{root}/{name}"``. Listing may run in any process and thread; deleting
    is left to one process by the caller (``CheckpointManager``'s rank 0).
    """

    root: str

    @abstractmethod
    def exists(self) -> bool:
        """Whether the root itself exists (a directory, or a non-empty prefix)."""

    @abstractmethod
    def children(self) -> dict[str, bool]:
        """Every child directory's name, with whether it holds committed metadata.

        Reads storage afresh on each call: other processes change the root.
        """

    @abstractmethod
    def usage(self, name: str) -> Usage:
        """Size and newest modification time of child ``name`` (0, None: it is gone)."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete child ``name``: its metadata first, then everything else in it.

        The order keeps a crash midway from leaving a committed checkpoint with
        missing data files: what is left lists as incomplete. A child already
        gone is no error; failing to delete the metadata raises.
        """

    @abstractmethod
    def identity(self, name: str) -> str:
        """A name of child ``name`` that is equal however the root was spelled."""


def checkpoint_metadata(reader: Any) -> Metadata:
    """The checkpoint's metadata through ``reader``: decoded from ``read_metadata()``,
    or as a reader of a foreign format (a DCP directory) translates it.

    The one way every loader, tool and the manager gets a checkpoint's metadata;
    duck-typed readers without ``translated_metadata`` are read as our format.
    """
    translate = getattr(reader, "translated_metadata", None)
    translated = translate() if translate is not None else None
    return translated if translated is not None else decode_metadata(reader.read_metadata())
