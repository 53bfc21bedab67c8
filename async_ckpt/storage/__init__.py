"""Storage backends: where checkpoint bytes go, and how a checkpoint commits."""

from .base import SegmentRecord, StorageReader, StorageWriter
from .detect import detect_reader, detect_writer
from .fsspec_backend import FsspecReader, FsspecWriter
from .local import FileSystemReader, FileSystemWriter

__all__ = [
    "FileSystemReader",
    "FileSystemWriter",
    "FsspecReader",
    "FsspecWriter",
    "SegmentRecord",
    "StorageReader",
    "StorageWriter",
    "detect_reader",
    "detect_writer",
]
