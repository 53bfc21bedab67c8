"""Choosing a storage backend from a checkpoint id (or a CheckpointManager root)."""

from __future__ import annotations

import os
import warnings
from typing import Any

from ..errors import StorageDetectionError
from .base import StorageReader, StorageRoot, StorageWriter
from .dcp import DcpReader, is_dcp_checkpoint
from .registry import FSSPEC, LOCAL, StorageBackend, backends

_BUILT_IN = "local paths, file://, and fsspec URLs (memory://, s3://, gs://, az://, ...)"


def _supported() -> str:
    plugins = [b.name for b in backends() if b not in (LOCAL, FSSPEC)]
    return _BUILT_IN + (f"; plugins: {', '.join(plugins)}" if plugins else "")


def _cannot_detect(checkpoint_id: object, role: str) -> StorageDetectionError:
    return StorageDetectionError(
        f"Cannot detect which storage {role} to use for checkpoint_id {checkpoint_id!r}. "
        f"Supported: {_supported()}. Pass storage_{role}= to choose one explicitly."
    )


def _require_id(checkpoint_id: object, role: str) -> str:
    if checkpoint_id is None:
        raise StorageDetectionError(
            f"Cannot detect storage: pass checkpoint_id= or storage_{role}= (neither was given)"
        )
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        raise _cannot_detect(checkpoint_id, role)
    return os.fspath(checkpoint_id)


def _accepts(backend: StorageBackend, cls: type, text: str) -> bool:
    """Whether ``cls`` of ``backend`` handles ``text``; a plugin that raises is skipped."""
    try:
        return bool(cls.validate_checkpoint_id(text))
    except Exception as exc:
        if backend in (LOCAL, FSSPEC):
            raise
        warnings.warn(
            f"async_ckpt storage plugin {backend.name!r} raised {type(exc).__name__} while "
            f"checking checkpoint_id {text!r} ({exc}); skipping it",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


def _options_for(backend: StorageBackend, text: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` without a ``storage_options`` of None; refused where they mean nothing."""
    options = dict(options)
    if options.get("storage_options", ...) is None:
        del options["storage_options"]
    if "storage_options" in options and backend is LOCAL:
        raise ValueError(
            f"storage_options apply to fsspec URLs (s3://, gs://, ...), not to the local "
            f"path {text!r}"
        )
    return options


def detect_writer(checkpoint_id: object, **options: Any) -> StorageWriter:
    """A writer for ``checkpoint_id``, or StorageDetectionError ("Cannot detect ...")."""
    text = _require_id(checkpoint_id, "writer")
    for backend in backends():
        if _accepts(backend, backend.writer, text):
            return backend.writer(text, **_options_for(backend, text, options))
    raise _cannot_detect(text, "writer")


def detect_reader(
    checkpoint_id: object, storage_options: dict[str, Any] | None = None
) -> StorageReader:
    """A reader for ``checkpoint_id``, or StorageDetectionError ("Cannot detect ...").

    ``storage_options`` go to an fsspec backend (credentials, endpoint, ...).

    A local torch.distributed.checkpoint directory (``.metadata``, no
    ``metadata.json``) gets a :class:`DcpReader`, which reads it without running its code.
    """
    text = _require_id(checkpoint_id, "reader")
    if is_dcp_checkpoint(text):
        return DcpReader(text)
    for backend in backends():
        if _accepts(backend, backend.reader, text):
            return backend.reader(
                text, **_options_for(backend, text, {"storage_options": storage_options})
            )
    raise _cannot_detect(text, "reader")


def detect_root(
    root: str | os.PathLike, storage_options: dict[str, Any] | None = None
) -> StorageRoot:
    """The checkpoints under ``root``, through the backend whose writer handles it.

    Raises StorageDetectionError ("Cannot detect ...") when no backend does, or
    when the one that does cannot list checkpoints.
    """
    text = os.fspath(root)
    for backend in backends():
        if _accepts(backend, backend.writer, text):
            if backend.root is None:
                raise StorageDetectionError(
                    f"storage backend {backend.name!r} handles {text!r} but has no StorageRoot "
                    "to list and delete the checkpoints under it, which CheckpointManager needs"
                )
            return backend.root(
                text, **_options_for(backend, text, {"storage_options": storage_options})
            )
    raise StorageDetectionError(
        f"Cannot detect which storage holds the checkpoint root {text!r}. "
        f"Supported: {_supported()}."
    )
