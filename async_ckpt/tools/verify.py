"""Re-read a whole checkpoint and check every checksum, reporting every problem found."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tqdm import tqdm

from ..errors import CorruptCheckpointError
from ..format.metadata import Chunk, Metadata, ObjectEntry, TensorEntry
from ..pipeline.load import verify_blocks
from ..pipeline.progress import byte_bar
from ..storage.base import StorageReader, checkpoint_metadata
from ..storage.detect import detect_reader

READ_PIECE = 64 * 1024 * 1024  # bytes read per call: bounded memory whatever the chunk size


@dataclass(frozen=True)
class Problem:
    """One defect: the key (or keys) it affects, the data file, what is wrong."""

    key: str
    file: str
    message: str


@dataclass
class VerifyReport:
    """What :func:`verify_checkpoint` checked and found."""

    checkpoint_id: str
    entries: int = 0
    chunks: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _pieces(meta: Metadata) -> list[tuple[str, Chunk]]:
    """Every stored byte range with the key it belongs to, in file order."""
    out: list[tuple[str, Chunk]] = []
    for key, entry in meta.entries.items():
        if isinstance(entry, TensorEntry):
            out += [(key, chunk) for chunk in entry.chunks]
        elif isinstance(entry, ObjectEntry):
            chunk = Chunk((), (), entry.file, entry.offset, entry.nbytes, entry.checksums)
            out.append((key, chunk))
    out.sort(key=lambda kc: (kc[1].file, kc[1].offset))
    return out


def _check_files(
    meta: Metadata, reader: StorageReader, pieces: list[tuple[str, Chunk]], report: VerifyReport
) -> set[str]:
    """Compare each data file's size with the metadata; returns the files that cannot be read."""
    unreadable: set[str] = set()
    for name, expected in sorted(meta.files.items()):
        keys = sorted({key for key, chunk in pieces if chunk.file == name})
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        try:
            actual = reader.file_size(name)
        except (CorruptCheckpointError, OSError) as exc:
            unreadable.add(name)
            report.problems.append(Problem(shown, name, str(exc)))
            continue
        if actual is not None and actual != expected:
            report.problems.append(
                Problem(
                    shown,
                    name,
                    f"data file {name!r} holds {actual} bytes but the metadata records {expected}"
                    " (truncated, extended or replaced)",
                )
            )
    return unreadable


def _check_piece(
    reader: StorageReader, key: str, chunk: Chunk, block: int, bar: tqdm, buf: bytearray
) -> None:
    """Read one chunk in block-aligned pieces and verify each piece's checksums."""
    if chunk.nbytes == 0:
        verify_blocks(memoryview(b""), chunk, 0, block, key)
        return
    step = len(buf)
    for start in range(0, chunk.nbytes, step):
        n = min(step, chunk.nbytes - start)
        view = memoryview(buf)[:n]
        reader.read_into(chunk.file, chunk.offset + start, view)
        verify_blocks(view, chunk, start // block, block, key)
        bar.update(n)


def verify_checkpoint(
    checkpoint_id: str | os.PathLike | None = None,
    *,
    storage_reader: StorageReader | None = None,
    metadata: Metadata | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Check every chunk and object entry of a checkpoint against its checksums.

    ``metadata`` is the checkpoint's, already decoded by the caller; without
    it, it is read and decoded here. Metadata that cannot be read raises
    (CheckpointNotFoundError, IncompleteCheckpointError, MetadataError);
    damaged data does not: each defect becomes a :class:`Problem` in the
    report, naming key and file. ``progress`` draws a tqdm bar (bytes) on stderr.
    A DCP checkpoint has no checksums: each chunk is read and decoded, which finds
    truncated or unreadable data only.
    """
    reader = storage_reader or detect_reader(checkpoint_id)
    try:
        meta = metadata if metadata is not None else checkpoint_metadata(reader)
        report = VerifyReport(reader.checkpoint_id, entries=len(meta.entries))
        pieces = _pieces(meta)
        unreadable = _check_files(meta, reader, pieces, report)
        block = meta.block_size
        largest = max((c.nbytes for _, c in pieces), default=0)
        buf = bytearray(max(1, min(largest, max(block, READ_PIECE // block * block))))
        total = sum(c.nbytes for _, c in pieces)
        with byte_bar(total, "verify", progress) as bar:
            for key, chunk in pieces:
                report.chunks += 1
                if chunk.file in unreadable:
                    bar.update(chunk.nbytes)
                    continue
                before = bar.n
                try:
                    _check_piece(reader, key, chunk, block, bar, buf)
                    report.bytes += chunk.nbytes
                except (CorruptCheckpointError, OSError) as exc:
                    report.problems.append(Problem(key, chunk.file, str(exc)))
                    bar.update(chunk.nbytes - (bar.n - before))
        return report
    finally:
        reader.close()
