"""fsspec backend: any fsspec URL (memory://, s3://, gs://, az://, file://).

Object stores have no rename, so the metadata object is written last and is
the commit: a prefix without it is an incomplete checkpoint.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    MissingBackendError,
)
from ..format.decode import MAX_METADATA_BYTES
from ..format.names import DATA_FILE, METADATA_FILE, is_safe_file_name
from . import s3_transfer
from .base import StorageReader, StorageRoot, StorageWriter, Usage
from .dcp_options import _NOT_SET, checkpoint_id_or_path, warn_ignored

# Packages that provide the common protocols, for a helpful error when one is missing.
_INSTALL_HINT = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs"}


def url_protocol(checkpoint_id: str) -> str:
    """The URL scheme of ``checkpoint_id`` (``"file"`` for a plain path)."""
    text = os.fspath(checkpoint_id)
    return text.split("://", 1)[0].lower() if "://" in text else "file"


def is_known_protocol(protocol: str) -> bool:
    """Whether fsspec knows ``protocol`` (installed or not)."""
    from fsspec.registry import known_implementations, registry

    return protocol in known_implementations or protocol in registry


def open_filesystem(checkpoint_id: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it for ``checkpoint_id``."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(os.fspath(checkpoint_id), **(storage_options or {}))
    except ImportError as exc:
        protocol = url_protocol(checkpoint_id)
        package = _INSTALL_HINT.get(protocol, f"the fsspec implementation of {protocol}://")
        raise MissingBackendError(
            f"checkpoint id {checkpoint_id!r} needs {package}; install it "
            f"(pip install {package if ' ' not in package else 'async_ckpt[s3]'})"
        ) from exc
    return fs, path.rstrip("/")


class FsspecWriter(StorageWriter):
    """Writes a checkpoint under an fsspec URL; the metadata object is written last."""

    can_share_files = True

    def __init__(
        self,
        checkpoint_id: str | None = None,
        single_file_per_rank: Any = _NOT_SET,
        sync_files: Any = _NOT_SET,
        thread_count: int | None = None,
        per_thread_copy_ahead: Any = _NOT_SET,
        overwrite: bool = True,
        *,
        path: str | None = None,
        storage_options: dict[str, Any] | None = None,
        serialization_format: Any = _NOT_SET,
        _extensions: Any = _NOT_SET,
        **fs_options: Any,
    ) -> None:
        # Positions and names as in torch.distributed.checkpoint's FsspecWriter (extra
        # keywords are fsspec options there too); options meaningless here warn.
        checkpoint_id = checkpoint_id_or_path(checkpoint_id, path)
        warn_ignored(
            single_file_per_rank=single_file_per_rank,
            sync_files=sync_files,
            per_thread_copy_ahead=per_thread_copy_ahead,
            serialization_format=serialization_format,
            _extensions=_extensions,
        )
        self.checkpoint_id = os.fspath(checkpoint_id)
        self.fs, self.path = open_filesystem(
            self.checkpoint_id, {**(storage_options or {}), **fs_options}
        )
        self.visible_across_processes = url_protocol(self.checkpoint_id) != "memory"
        self.overwrite = overwrite
        self.thread_count = thread_count

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str) -> bool:
        return is_known_protocol(url_protocol(checkpoint_id))

    def _join(self, name: str) -> str:
        return f"{self.path}/{name}"

    def prepare(self, *, coordinator: bool) -> None:
        if coordinator and not self.overwrite and self.fs.exists(self._join(METADATA_FILE)):
            raise CheckpointExistsError(
                f"Checkpoint already exists: {self.checkpoint_id!r} holds a committed checkpoint "
                "and the writer has overwrite=False; pass overwrite=True to the "
                "writer to replace it, or save under a new checkpoint_id"
            )
        self.fs.makedirs(self.path, exist_ok=True)

    def write_file(self, name: str, segments: Sequence[memoryview]) -> None:
        if s3_transfer.is_s3(self.fs):
            s3_transfer.upload(self.fs, self._join(name), segments)
            return
        with self.fs.open(self._join(name), "wb") as f:
            for seg in segments:
                f.write(seg.cast("B") if seg.format != "B" else seg)

    def commit(self, metadata: bytes) -> bytes | None:
        # No lock on an object store: a commit racing this read and write leaves its
        # files to sweep_orphans instead (space, never a loss).
        previous = self.committed_metadata()
        self.fs.pipe_file(self._join(METADATA_FILE), metadata)
        return previous

    def committed_metadata(self) -> bytes | None:
        try:
            return self.fs.cat_file(self._join(METADATA_FILE), start=0, end=MAX_METADATA_BYTES + 1)
        except (FileNotFoundError, IsADirectoryError):
            return None

    def _base_path(self, base: str) -> str:
        return self.fs._strip_protocol(os.fspath(base)).rstrip("/")

    def base_metadata(self, base: str) -> bytes | None:
        try:
            path = f"{self._base_path(base)}/{METADATA_FILE}"
            return self.fs.cat_file(path, start=0, end=MAX_METADATA_BYTES + 1)
        except (FileNotFoundError, IsADirectoryError):
            return None

    def share_file(self, base: str, name: str, target: str, size: int) -> bool:
        # A server-side copy (S3 CopyObject, GCS rewrite): no bytes through this
        # host, and the copy is this checkpoint's own object.
        source, copy = f"{self._base_path(base)}/{name}", self._join(target)
        try:
            if self.fs.size(source) != size:
                return False
            self.fs.copy(source, copy)
            return True
        except Exception:  # no server-side copy here (NotImplementedError), gone, refused
            try:
                self.fs.rm_file(copy)  # a partial copy, under this save's own name
            except Exception:
                pass
            return False

    def _listing(self) -> list[dict[str, Any]]:
        self.fs.invalidate_cache(self.path)
        try:
            return self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return []

    def missing_files(self, names: Iterable[str]) -> list[str]:
        present = {info["name"].rsplit("/", 1)[-1] for info in self._listing()}
        return [name for name in names if name not in present]

    def remove_files(self, names: Iterable[str]) -> list[str]:
        removed = []
        for name in names:
            try:
                self.fs.rm_file(self._join(name))
                removed.append(name)
            except FileNotFoundError:
                pass
        return removed

    def sweep_orphans(self, keep: Iterable[str], older_than_s: float) -> list[str]:
        keep = set(keep)
        cutoff = time.time() - older_than_s
        newest: dict[str, float] = {}
        groups: dict[str, list[str]] = {}
        for info in self._listing():
            name = info["name"].rsplit("/", 1)[-1]
            match = DATA_FILE.match(name)
            if not match or name in keep:
                continue
            mtime = modified_time(info)
            if mtime is None:  # the store does not say: never guess that a file is old
                newest[match["save_id"]] = float("inf")
                continue
            groups.setdefault(match["save_id"], []).append(name)
            newest[match["save_id"]] = max(newest.get(match["save_id"], 0.0), mtime)
        old = [name for sid, names in groups.items() if newest[sid] < cutoff for name in names]
        return self.remove_files(old)

    def abort(self, names: Iterable[str]) -> None:
        self.remove_files(names)


def modified_time(info: dict[str, Any]) -> float | None:
    """The modification time in an fsspec ``info`` dict, whatever the backend calls it."""
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:  # fsspec's memory store gives naive UTC times
                value = value.replace(tzinfo=datetime.timezone.utc)
            return value.timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


class FsspecReader(StorageReader):
    """Reads a checkpoint under an fsspec URL, fetching only the byte ranges asked for."""

    # Requests are costly here: the loader fetches back-to-back chunks together.
    coalesce_reads = True

    def __init__(
        self,
        checkpoint_id: str | None = None,
        *,
        path: str | None = None,
        storage_options: dict[str, Any] | None = None,
        **fs_options: Any,
    ) -> None:
        checkpoint_id = checkpoint_id_or_path(checkpoint_id, path)  # ``path=``: DCP's keyword
        self.checkpoint_id = os.fspath(checkpoint_id)
        self.fs, self.path = open_filesystem(
            self.checkpoint_id, {**(storage_options or {}), **fs_options}
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str) -> bool:
        return FsspecWriter.validate_checkpoint_id(checkpoint_id)

    def read_metadata(self) -> bytes:
        try:
            # bounded: a huge object is refused after MAX + 1 bytes, not read whole
            data = self.fs.cat_file(
                f"{self.path}/{METADATA_FILE}", start=0, end=MAX_METADATA_BYTES + 1
            )
        except IsADirectoryError as exc:
            raise CorruptCheckpointError(
                f"{METADATA_FILE} of {self.checkpoint_id!r} is not a file"
            ) from exc
        except FileNotFoundError:
            self.fs.invalidate_cache(self.path)
            if self.fs.exists(self.path) and self.fs.ls(self.path, detail=False):
                raise IncompleteCheckpointError(
                    f"checkpoint {self.checkpoint_id!r} is incomplete: it has no {METADATA_FILE}, "
                    "so its save never committed. Load an earlier checkpoint."
                ) from None
            raise CheckpointNotFoundError(f"no checkpoint at {self.checkpoint_id!r}") from None
        if len(data) > MAX_METADATA_BYTES:
            return data[: MAX_METADATA_BYTES + 1]
        return data

    def file_size(self, name: str) -> int | None:
        if not is_safe_file_name(name):
            raise CorruptCheckpointError(f"refusing data file name {name!r}")
        try:
            size = self.fs.size(f"{self.path}/{name}")
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(
                f"data file {name!r} of checkpoint {self.checkpoint_id!r} is missing"
            ) from exc
        return None if size is None else int(size)

    def read_into(self, name: str, offset: int, dest: memoryview) -> None:
        if not is_safe_file_name(name):
            raise CorruptCheckpointError(f"refusing data file name {name!r}")
        view = dest.cast("B") if dest.format != "B" else dest
        try:
            if s3_transfer.is_s3(self.fs):
                got = s3_transfer.download_into(self.fs, f"{self.path}/{name}", offset, view)
                data = None
            else:
                data = self.fs.cat_file(f"{self.path}/{name}", start=offset, end=offset + len(view))
                got = len(data)
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(
                f"data file {name!r} of checkpoint {self.checkpoint_id!r} is missing"
            ) from exc
        if got != len(view):
            raise CorruptCheckpointError(
                f"data file {name!r} of {self.checkpoint_id!r} is truncated: expected "
                f"{len(view)} bytes at offset {offset}, got {got}"
            )
        if data is not None:
            view[:] = data


class FsspecRoot(StorageRoot):
    """The checkpoint directories under an fsspec URL (a CheckpointManager root)."""

    def __init__(self, root: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self.root = os.fspath(root)
        self.fs, self.path = open_filesystem(self.root, storage_options)

    def _join(self, name: str) -> str:
        return f"{self.path}/{name}"

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def children(self) -> dict[str, bool]:
        self.fs.invalidate_cache(self.path)  # other ranks and processes change it
        try:
            listing = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return {}
        found = {
            item["name"].rstrip("/").rsplit("/", 1)[-1]: False
            for item in listing
            if item.get("type") == "directory"
        }
        for meta in self.fs.glob(self._join(f"*/{METADATA_FILE}")):
            found[meta.rstrip("/").rsplit("/", 2)[-2]] = True
        return found

    def usage(self, name: str) -> Usage:
        size, newest = 0, None
        for info in self.fs.find(self._join(name), detail=True).values():
            size += int(info.get("size") or 0)
            stamp = modified_time(info)
            if stamp is not None:
                newest = stamp if newest is None else max(newest, stamp)
        return Usage(size, newest)

    def delete(self, name: str) -> None:
        path = self._join(name)
        try:
            self.fs.rm_file(f"{path}/{METADATA_FILE}")
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def identity(self, name: str) -> str:
        return f"{self.fs.protocol}:{self._join(name)}"
