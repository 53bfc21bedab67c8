"""Storage backends: where checkpoint bytes go, and how a checkpoint commits.

docs/storage-backends.md describes the contract and how to add a backend.
"""

from .base import StorageReader, StorageRoot, StorageWriter, Usage
from .dcp import DcpReader, is_dcp_checkpoint
from .detect import detect_reader, detect_root, detect_writer
from .fsspec_backend import FsspecReader, FsspecRoot, FsspecWriter
from .local import FileSystemReader, FileSystemRoot, FileSystemWriter
from .registry import ENTRY_POINT_GROUP, StorageBackend, backends, register_backend

__all__ = [
    "DcpReader",
    "ENTRY_POINT_GROUP",
    "FileSystemReader",
    "FileSystemRoot",
    "FileSystemWriter",
    "FsspecReader",
    "FsspecRoot",
    "FsspecWriter",
    "StorageBackend",
    "StorageReader",
    "StorageRoot",
    "StorageWriter",
    "Usage",
    "backends",
    "detect_reader",
    "detect_root",
    "detect_writer",
    "is_dcp_checkpoint",
    "register_backend",
]
