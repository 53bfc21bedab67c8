"""How a load's reads are scheduled: which reader thread reads what, in what order,
and the window that serves back-to-back small chunks from one read."""

from __future__ import annotations

import itertools

import torch

from ..format.metadata import Chunk
from ..planning.read_plan import Target
from ..storage.base import StorageReader

TINY_CHUNK_BYTES = 64 * 1024
"""Chunks this small are read by the loading thread itself (see ``load._read_all``)."""

JOB_BYTES = 8 * 1024 * 1024
"""Reads handed to a reader thread at once: a future per tiny tensor costs more than it reads."""


def read_jobs(
    groups: list[list[tuple[Target, Chunk]]], threads: int
) -> list[list[list[tuple[Target, Chunk]]]]:
    """Consecutive read groups of one file packed into jobs of about :data:`JOB_BYTES`
    (at least four jobs per thread where there are that many groups, to keep every
    thread busy to the end), the files' jobs taken in turn: the threads then read
    the files side by side, each front to back, as the kernel's read-ahead expects."""
    total = sum(c.nbytes for g in groups for _, c in g)
    size = max(1, min(JOB_BYTES, total // (4 * max(threads, 1))))
    per_file: dict[str, list[list[list[tuple[Target, Chunk]]]]] = {}
    job: list[list[tuple[Target, Chunk]]] = []
    held = 0
    for g in groups:
        if job and (g[0][1].file != job[0][0][1].file or held >= size):
            per_file.setdefault(job[0][0][1].file, []).append(job)
            job, held = [], 0
        job.append(g)
        held += sum(c.nbytes for _, c in g)
    if job:
        per_file.setdefault(job[0][0][1].file, []).append(job)
    turns = itertools.zip_longest(*per_file.values())
    return [j for turn in turns for j in turn if j is not None]


class WindowReader:
    """Serves reads that fall inside one prefetched byte range of a data file."""

    def __init__(self, reader: StorageReader, name: str, start: int, data: memoryview) -> None:
        self.reader, self.name, self.start, self.data = reader, name, start, data
        self.checkpoint_id = reader.checkpoint_id

    @classmethod
    def fetch(cls, reader: StorageReader, group: list[tuple[Target, Chunk]]) -> WindowReader:
        first, last = group[0][1], group[-1][1]
        buf = torch.empty(last.offset + last.nbytes - first.offset, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        reader.read_into(first.file, first.offset, view)
        return cls(reader, first.file, first.offset, view)

    def read_into(self, name: str, offset: int, dest: memoryview) -> None:
        view = dest.cast("B") if dest.format != "B" else dest
        lo = offset - self.start
        if name != self.name or lo < 0 or lo + len(view) > len(self.data):
            self.reader.read_into(name, offset, dest)
            return
        view[:] = self.data[lo : lo + len(view)]
