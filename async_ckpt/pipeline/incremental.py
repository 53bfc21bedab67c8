"""Incremental saves: chunks whose bytes equal the base checkpoint's are shared, not written.

Equality is decided by content alone: a 128-bit XXH3 digest of the staged
bytes, recorded per chunk in the metadata of every incremental save
(``Chunk.digest``), compared with the base's digest of the chunk at the same
place in the same tensor. A match is shared by giving the new checkpoint its
own reference to the base's data file (a hard link on a local file system, a
server-side copy on an object store, see ``StorageWriter.share_file``), so
that deleting either checkpoint never breaks the other. When the file cannot
be shared (the base was deleted meanwhile, another file system), the chunk
is written as in a full save: an incremental save never fails for want of
its base. docs/incremental.md tells the whole story.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, replace
from typing import Any

import xxhash

from ..errors import CheckpointError
from ..format.decode import decode_metadata
from ..format.metadata import Chunk, Metadata, TensorEntry
from ..format.names import data_file_name
from ..storage.base import StorageWriter
from ..storage.direct import byte_view

log = logging.getLogger(__name__)

DIGEST_ALGORITHM = "xxh3-128"
"""What ``Chunk.digest`` holds: XXH3-128 of the chunk's bytes, 32 lowercase hex digits."""


def content_digest(data: memoryview) -> str:
    """The 128-bit content digest of ``data`` (see :data:`DIGEST_ALGORITHM`)."""
    return xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True)
class Incremental:
    """How a save treats unchanged bytes; ``None`` in its place means a full save.

    ``base``: the checkpoint id whose chunks may be shared (an absolute path
    for local storage), or None to only record digests, so that this save can
    be the base of the next one.
    """

    base: str | None = None


def incremental_save(incremental: bool, base: Any) -> Incremental | None:
    """What a save call's ``incremental``/``base`` arguments ask for (``base`` implies it).

    A local ``base`` is made absolute here, in the caller's working directory:
    the worker process that reads it may run elsewhere.
    """
    if base is None:
        return Incremental() if incremental else None
    try:
        text = os.fspath(base)
    except TypeError:
        raise CheckpointError(
            f"base must be a checkpoint id (a path or URL), not {type(base).__qualname__}"
        ) from None
    if not isinstance(text, str) or not text:
        raise CheckpointError(f"base must be a non-empty checkpoint id, got {base!r}")
    if text.startswith("file://") or "://" not in text:
        text = os.path.abspath(text.removeprefix("file://"))
    return Incremental(text)


ChunkPlace = tuple[str, tuple[int, ...], tuple[int, ...]]
"""A chunk's identity across saves: tensor key, offsets and sizes in the tensor."""

SLICE_BYTES = 8 * 1024 * 1024
"""Incremental saves store tensors bigger than this in row blocks about this size,
so that an embedding table where a few rows change rewrites a few blocks."""


def row_blocks(
    offsets: tuple[int, ...], sizes: tuple[int, ...], data: memoryview
) -> list[tuple[tuple[int, ...], tuple[int, ...], memoryview]]:
    """``data`` (a chunk's bytes, row-major) as chunks of whole rows of about
    :data:`SLICE_BYTES`; one chunk when it is small or has a single row."""
    data = byte_view(data)
    if data.nbytes <= SLICE_BYTES or not sizes or sizes[0] < 2:
        return [(offsets, sizes, data)]
    row = data.nbytes // sizes[0]
    step = max(1, SLICE_BYTES // row)
    return [
        (
            (offsets[0] + r, *offsets[1:]),
            (min(step, sizes[0] - r), *sizes[1:]),
            data[r * row : (r + min(step, sizes[0] - r)) * row],
        )
        for r in range(0, sizes[0], step)
    ]


SHARED_FILE_INDEX = 1_000_000
"""Where a save numbers the files it shares from its base (``<save_id>-r<rank>-<n>.data``,
``n`` from here on): never the number of a file it writes (those count from 0)."""


class BaseChunks:
    """The base checkpoint's digested chunks, and the files of it this save shares.

    A shared file is given a name of this save (its save id, rank and a number
    from :data:`SHARED_FILE_INDEX`): the new checkpoint owns that name as it
    owns the files it writes, so an abort deletes only names it made, two
    saves never meet on one name, and a commit that replaces the base at the
    same id (``base`` = the target) cannot take it away. Thread-safe: the
    write threads of one rank ask it at once.
    """

    def __init__(
        self, writer: StorageWriter, base: str, metadata: Metadata, save_id: str, rank: int
    ) -> None:
        self.writer, self.base, self.block_size = writer, base, metadata.block_size
        self.file_sizes = metadata.files
        self.save_id, self.rank = save_id, rank
        self._chunks: dict[ChunkPlace, Chunk] = {
            (key, c.offsets, c.sizes): c
            for key, entry in metadata.entries.items()
            if isinstance(entry, TensorEntry)
            for c in entry.chunks
            if c.digest is not None
        }
        self._lock = threading.Lock()
        self._names: dict[str, str | None] = {}  # base file -> its name here (None: not shared)
        self.shared: dict[str, int] = {}  # the names this save made for shared files, sizes

    @classmethod
    def load(cls, writer: StorageWriter, base: str, save_id: str, rank: int) -> BaseChunks | None:
        """The base's chunks, or None (logged) when it cannot serve as a base."""
        if not writer.can_share_files:
            log.warning(
                "incremental save: %s cannot share files with a base; writing every byte",
                type(writer).__name__,
            )
            return None
        try:
            payload = writer.base_metadata(base)
            if payload is None:
                log.warning(
                    "incremental save: base %r has no committed checkpoint; writing every byte",
                    base,
                )
                return None
            return cls(writer, base, decode_metadata(payload), save_id, rank)
        except Exception as exc:  # any backend's error: an incremental save never fails for it
            log.warning(
                "incremental save: base %r cannot be read (%s); writing every byte", base, exc
            )
            return None

    def match(self, place: ChunkPlace, digest: str, nbytes: int) -> Chunk | None:
        """The base's chunk with these bytes at ``place``, placed in this save's copy of
        its file; None when there is none or the file cannot be shared."""
        chunk = self._chunks.get(place)
        if chunk is None or chunk.digest != digest or chunk.nbytes != nbytes:
            return None
        name = self._share(chunk.file)
        return None if name is None else replace(chunk, file=name)

    def _share(self, base_name: str) -> str | None:
        with self._lock:
            if base_name not in self._names:
                name = data_file_name(self.save_id, self.rank, SHARED_FILE_INDEX + len(self._names))
                size = self.file_sizes[base_name]
                made = self.writer.share_file(self.base, base_name, name, size)
                self._names[base_name] = name if made else None
                if made:
                    self.shared[name] = size
            return self._names[base_name]
