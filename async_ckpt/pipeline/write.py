"""Write one rank's segments of a save into new data files, several files in parallel."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ..storage.base import SegmentRecord, StorageWriter, data_file_name
from ..storage.retry import write_with_retry


def split_files(sizes: Sequence[int], n_files: int) -> list[list[int]]:
    """Spread segment indices over up to ``n_files`` files with balanced bytes."""
    n_files = max(1, min(n_files, len(sizes)))
    bins: list[list[int]] = [[] for _ in range(n_files)]
    load = [0] * n_files
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = load.index(min(load))
        bins[j].append(i)
        load[j] += sizes[i]
    return [sorted(b) for b in bins if b]


def write_rank_files(
    writer: StorageWriter,
    segments: list[memoryview],
    rank: int,
    save_id: str,
    threads: int,
    block_size: int,
    files: dict[str, int],
) -> dict[int, tuple[str, SegmentRecord]]:
    """Write this rank's segments into new data files in parallel; returns where each landed.

    ``files`` receives each file's name and size as it completes, so that after a
    failure the caller still knows which files to delete (and the next wave's
    files are numbered after them).
    """
    groups = split_files([s.nbytes for s in segments], threads) if segments else []
    placed: dict[int, tuple[str, SegmentRecord]] = {}
    first = len(files)

    def write_one(index: int, members: list[int]) -> None:
        name = data_file_name(save_id, rank, first + index)
        records = write_with_retry(writer, name, [segments[m] for m in members], block_size)
        for m, rec in zip(members, records, strict=True):
            placed[m] = (name, rec)
        files[name] = sum(segments[m].nbytes for m in members)

    if len(groups) <= 1:
        for index, members in enumerate(groups):
            write_one(index, members)
    else:
        with ThreadPoolExecutor(len(groups), thread_name_prefix="async_ckpt-write") as pool:
            for f in [pool.submit(write_one, i, g) for i, g in enumerate(groups)]:
                f.result()
    return placed
