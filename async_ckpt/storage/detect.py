"""Choosing a storage backend from a checkpoint id."""

from __future__ import annotations

import os

from ..errors import StorageDetectionError
from .base import StorageReader, StorageWriter
from .fsspec_backend import FsspecReader, FsspecWriter
from .local import FileSystemReader, FileSystemWriter

# Tried in order: the first whose validate_checkpoint_id accepts the id wins.
WRITERS: list[type[StorageWriter]] = [FileSystemWriter, FsspecWriter]
READERS: list[type[StorageReader]] = [FileSystemReader, FsspecReader]

_SUPPORTED = "local paths, file://, and fsspec URLs (memory://, s3://, gs://, az://, ...)"


def _cannot_detect(checkpoint_id: object, role: str) -> StorageDetectionError:
    return StorageDetectionError(
        f"Cannot detect which storage {role} to use for checkpoint_id {checkpoint_id!r}. "
        f"Supported: {_SUPPORTED}. Pass storage_{role}= to choose one explicitly."
    )


def _require_id(checkpoint_id: object, role: str) -> str:
    if checkpoint_id is None:
        raise StorageDetectionError(
            f"Cannot detect storage: pass checkpoint_id= or storage_{role}= (neither was given)"
        )
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        raise _cannot_detect(checkpoint_id, role)
    return os.fspath(checkpoint_id)


def detect_writer(checkpoint_id: object, **options: object) -> StorageWriter:
    """A writer for ``checkpoint_id``, or StorageDetectionError ("Cannot detect ...")."""
    text = _require_id(checkpoint_id, "writer")
    for cls in WRITERS:
        if cls.validate_checkpoint_id(text):
            return cls(text, **options)
    raise _cannot_detect(text, "writer")


def detect_reader(checkpoint_id: object) -> StorageReader:
    """A reader for ``checkpoint_id``, or StorageDetectionError ("Cannot detect ...")."""
    text = _require_id(checkpoint_id, "reader")
    for cls in READERS:
        if cls.validate_checkpoint_id(text):
            return cls(text)
    raise _cannot_detect(text, "reader")
