"""Write one rank's segments of a save into new data files, several files in parallel.

Each file's segments are checksummed here, once, while the storage writer
stores them: a backend only moves bytes, and a retried write stores the same
bytes the checksums describe (the bytes stay unchanged until the save ends).

Checksumming each file before writing it kept the disk idle meanwhile. A few
checksum threads (one per four cores) now take the files as the writers hand
them over: CRC-32C runs at 8-11 GB/s on one core, ahead of the disk, and one
checksum thread per file competed with the writes' own copies for the cores.
Sync save of 1 GiB on 2 cores, interleaved, 10 rounds: one checksum thread
1.01x the best write floor, four 1.10-1.14x, none at all 0.95x
(docs/performance.md, "Checksums beside the writes").

The writers and checksum threads are plain threads (:mod:`async_ckpt.threads`
says why), so a save still writes at interpreter exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from functools import partial
from typing import NamedTuple

from ..format.checksum import block_checksums
from ..format.names import DATA_FILE, data_file_name
from ..storage.base import StorageWriter
from ..storage.retry import write_with_retry
from ..threads import Workers, run_in_threads, usable_cores
from .incremental import BaseChunks, ChunkPlace, content_digest


class SegmentRecord(NamedTuple):
    """Where one written segment landed in its file, with its block checksums.

    A NamedTuple, not a dataclass: one is made per tensor of every save
    (100k for a big optimizer state), and a tuple is built several times faster.
    """

    offset: int
    nbytes: int
    checksums: tuple[int, ...]
    digest: str | None = None  # content digest, incremental saves only


def segment_records(segments: Sequence[memoryview], block_size: int) -> list[SegmentRecord]:
    """Offsets and block checksums of ``segments`` laid end to end in one file."""
    records = []
    offset = 0
    for seg in segments:
        nbytes = seg.nbytes
        records.append(SegmentRecord(offset, nbytes, tuple(block_checksums(seg, block_size))))
        offset += nbytes
    return records


# Segments that fill whole pages go first in their file: laid end to end they
# keep each other's file offsets page-aligned, which direct I/O needs.
_PAGE = 4096


def split_files(sizes: Sequence[int], n_files: int) -> list[list[int]]:
    """Spread segment indices over up to ``n_files`` files with balanced bytes;
    in each file, the whole-page segments first, each group in index order."""
    n_files = max(1, min(n_files, len(sizes)))
    bins: list[list[int]] = [[] for _ in range(n_files)]
    load = [0] * n_files
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = load.index(min(load))
        bins[j].append(i)
        load[j] += sizes[i]
    return [sorted(b, key=lambda i: (sizes[i] % _PAGE != 0, i)) for b in bins if b]


CHECKSUM_THREADS = max(1, usable_cores() // 4)
"""Threads that checksum a save's files while they are written (see the module docstring)."""


def _file_index(name: str) -> int:
    match = DATA_FILE.match(name)
    return int(match["index"]) if match else -1


def write_rank_files(
    writer: StorageWriter,
    segments: list[memoryview],
    rank: int,
    save_id: str,
    threads: int,
    block_size: int,
    files: dict[str, int],
    places: Sequence[ChunkPlace] | None = None,
    base: BaseChunks | None = None,
) -> dict[int, tuple[str, SegmentRecord]]:
    """Write this rank's segments into new data files in parallel; returns where each landed.

    ``files`` receives each file's name and size as it completes, so that after a
    failure the caller still knows which files to delete (and the next wave's
    files are numbered after them).

    Incremental saves pass ``places`` (each segment's chunk identity): every
    segment is digested, in the write threads, and one whose digest equals
    ``base``'s chunk at the same place is not written; it lands where the
    base's bytes are, in a file ``base`` shares into this checkpoint.
    """
    groups = split_files([s.nbytes for s in segments], threads) if segments else []
    placed: dict[int, tuple[str, SegmentRecord]] = {}
    # after the files of earlier waves (an incremental wave may leave numbers unused)
    first = 1 + max((_file_index(name) for name in files), default=-1)

    def write_one(index: int, members: list[int], checksummer: Workers) -> None:
        digests = {m: content_digest(segments[m]) for m in members} if places else {}
        if base is not None and places:
            members = [m for m in members if not _shared(m, digests[m])]
        if not members:
            return
        name = data_file_name(save_id, rank, first + index)
        content = [segments[m] for m in members]
        checksums: Future = checksummer.submit(segment_records, content, block_size)
        write_with_retry(writer, name, content)
        files[name] = sum(segments[m].nbytes for m in members)  # written: the caller owns it
        for m, rec in zip(members, checksums.result(), strict=True):
            placed[m] = (name, rec._replace(digest=digests[m]) if digests else rec)

    def _shared(m: int, digest: str) -> bool:
        assert base is not None and places is not None
        chunk = base.match(places[m], digest, segments[m].nbytes)
        if chunk is None:
            return False
        checksums = (
            chunk.checksums
            if base.block_size == block_size
            else tuple(block_checksums(segments[m], block_size))
        )
        placed[m] = (chunk.file, SegmentRecord(chunk.offset, chunk.nbytes, checksums, digest))
        return True

    if not groups:
        return placed
    # Leaving the block waits for every checksum: no thread reads the buffers after this.
    with Workers(min(CHECKSUM_THREADS, len(groups)), "async_ckpt-checksum") as checksummer:
        calls = [partial(write_one, i, g, checksummer) for i, g in enumerate(groups)]
        run_in_threads(calls, "async_ckpt-write")
    return placed
