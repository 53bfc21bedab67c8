"""Reading torch.distributed.checkpoint (DCP) checkpoints directly, without running their code.

A DCP checkpoint is a directory (or fsspec prefix) with a pickled
``.metadata`` and ``__<rank>_<n>.distcp`` data files. :class:`DcpReader`
decodes the metadata allow-listed and offers it in our model
(``translated_metadata()``, see ``format/dcp.py``); the loader then reads raw
bytes as from our own format. A tensor chunk DCP stored with ``torch.save``
is served from its decoded blob (``torch.load(weights_only=True)``); the
last decoded blobs are kept, so that a reshard reading a chunk row range by
row range decodes it once. Raw (safetensors) chunks are read where they lie.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..format.dcp import (
    DCP_METADATA_FILE,
    MAX_DCP_METADATA_BYTES,
    DcpMetadata,
    decode_dcp_metadata,
)
from ..format.dcp_payload import (
    SAFETENSORS_PREFIX,
    decode_object_blob,
    decode_tensor_blob,
    parse_safetensors_header,
    safetensors_header_length,
)
from ..format.dcp_translate import Blob, RawTensor, Translation, raw_groups, translate
from ..format.metadata import Metadata
from ..format.names import METADATA_FILE
from .base import StorageReader
from .fsspec_backend import FsspecReader
from .local import FileSystemReader
from .local_paths import _OPEN_READ, _read_regular_file

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
"""Decoded blobs kept for further reads (the newest one is kept whatever its size)."""

_RUN_BYTES = 64 * 1024 * 1024  # back-to-back byte entries read in one request, up to this


def _is_local(checkpoint_id: str) -> bool:
    return checkpoint_id.startswith("file://") or "://" not in checkpoint_id


def _local_dir(checkpoint_id: str) -> Path:
    return Path(checkpoint_id.removeprefix("file://"))


def is_dcp_checkpoint(checkpoint_id: str | os.PathLike) -> bool:
    """Whether a local id is a DCP checkpoint: it has ``.metadata`` and no ``metadata.json``.

    Other ids (fsspec URLs) are not probed, so detecting their reader costs no request;
    pass ``storage_reader=DcpReader(url)`` to read a DCP checkpoint there.
    """
    text = os.fspath(checkpoint_id)
    if not _is_local(text):
        return False
    path = _local_dir(text)
    return (path / DCP_METADATA_FILE).is_file() and not (path / METADATA_FILE).exists()


class _BlobCache:
    """The last decoded blobs, newest last, within a byte budget."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.size = 0

    def get(self, name: str) -> torch.Tensor | None:
        found = self.items.get(name)
        if found is not None:
            self.items.move_to_end(name)
        return found

    def put(self, name: str, data: torch.Tensor) -> None:
        self.items[name] = data
        self.size += data.numel()
        while len(self.items) > 1 and self.size > self.limit:
            _, old = self.items.popitem(last=False)
            self.size -= old.numel()

    def clear(self) -> None:
        self.items.clear()
        self.size = 0


class DcpReader(StorageReader):
    """Reads a torch.distributed.checkpoint directory (or fsspec URL) through our loader.

    Nothing the checkpoint holds can run code: ``.metadata`` is decoded with an
    allow-listed unpickler, data blobs with ``torch.load(weights_only=True)``, and
    values whose classes torch does not allow load only if ``async_ckpt.allow_class``
    listed them. DCP stores no checksums, so nothing is verified beyond the blobs'
    own structure. Stream transforms (DCP's ``_extensions``, e.g. compression) are refused.
    """

    def __init__(
        self,
        checkpoint_id: str | os.PathLike,
        *,
        storage_options: dict[str, Any] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.checkpoint_id = os.fspath(checkpoint_id)
        self._files: StorageReader
        if _is_local(self.checkpoint_id):
            self._files = FileSystemReader(self.checkpoint_id)
        else:
            self._files = FsspecReader(self.checkpoint_id, storage_options=storage_options)
        self.coalesce_reads = self._files.coalesce_reads
        self._lock = threading.Lock()
        self._translating = threading.Lock()
        self._translation: Translation | None = None
        self._cache = _BlobCache(cache_bytes)
        self._decoding: dict[str, threading.Lock] = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return is_dcp_checkpoint(checkpoint_id)

    # -------------------------------------------------------------------------- metadata

    def read_metadata(self) -> bytes:
        """The bytes of DCP's ``.metadata`` (a pickle: decode with ``format.dcp``, never pickle)."""
        missing = (
            f"no torch.distributed.checkpoint at {self.checkpoint_id!r}: it has no "
            f"{DCP_METADATA_FILE} file (a DCP save writes it last)"
        )
        if isinstance(self._files, FsspecReader):
            fs, base = self._files.fs, self._files.path
            try:  # bounded: a huge object is refused after the limit, not read whole
                data = fs.cat_file(
                    f"{base}/{DCP_METADATA_FILE}", start=0, end=MAX_DCP_METADATA_BYTES + 1
                )
            except FileNotFoundError:
                raise CheckpointNotFoundError(missing) from None
            except IsADirectoryError as exc:
                raise CorruptCheckpointError(
                    f"{DCP_METADATA_FILE} of {self.checkpoint_id!r} is not a file"
                ) from exc
            return bytes(data)
        path = _local_dir(self.checkpoint_id) / DCP_METADATA_FILE
        try:
            fd = os.open(path, _OPEN_READ)
        except FileNotFoundError:
            if not path.parent.is_dir():
                missing = f"no checkpoint at {self.checkpoint_id!r}: the directory does not exist"
            raise CheckpointNotFoundError(missing) from None
        except OSError as exc:  # ELOOP: a symlink
            raise CorruptCheckpointError(
                f"cannot open {path}: {exc}; it must be a regular file"
            ) from exc
        return _read_regular_file(path, MAX_DCP_METADATA_BYTES, fd, what="DCP .metadata")

    def translated_metadata(self) -> Metadata:
        """The checkpoint in our model (decoded once per reader)."""
        return self._translated().metadata

    def _translated(self) -> Translation:
        with self._translating:
            if self._translation is None:
                self._translation = self._translate()
            return self._translation

    def _translate(self) -> Translation:
        dcp = decode_dcp_metadata(self.read_metadata())
        raw: dict[tuple[str, int], dict[str, RawTensor]] = {}
        sizes: dict[str, int] = {}
        for file, offset in sorted(raw_groups(dcp)):
            raw[(file, offset)] = self._safetensors_header(file, offset)
            size = self._files.file_size(file)
            if size is not None:
                sizes[file] = size
        return translate(dcp, values=self._byte_values(dcp), raw=raw, file_sizes=sizes)

    def _safetensors_header(self, file: str, offset: int) -> dict[str, RawTensor]:
        what = f"data file {file!r} at {offset}"
        prefix = bytearray(SAFETENSORS_PREFIX)
        self._files.read_into(file, offset, memoryview(prefix))
        header = bytearray(safetensors_header_length(prefix, what))
        self._files.read_into(file, offset + SAFETENSORS_PREFIX, memoryview(header))
        return parse_safetensors_header(header, offset + SAFETENSORS_PREFIX + len(header), what)

    def _byte_values(self, dcp: DcpMetadata) -> dict[str, Any]:
        """Every byte entry's value; DCP writes them back to back, so a run is one read."""
        items = sorted(
            (s.file, s.offset, s.length, fqn)
            for fqn in dcp.byte_keys
            if (s := dcp.storage.get((fqn, None))) is not None
        )
        values: dict[str, Any] = {}
        start = 0
        while start < len(items):
            end = start + 1
            file, first, length, _ = items[start]
            stop = first + length
            while (
                end < len(items)
                and items[end][0] == file
                and items[end][1] == stop
                and stop + items[end][2] - first <= _RUN_BYTES
            ):
                stop += items[end][2]
                end += 1
            buf = bytearray(stop - first)
            self._files.read_into(file, first, memoryview(buf))
            for _, offset, size, fqn in items[start:end]:
                piece = memoryview(buf)[offset - first : offset - first + size]
                values[fqn] = decode_object_blob(piece, f"entry {fqn!r}")
            start = end
        return values

    # ------------------------------------------------------------------------------ data

    def _decoded(self, name: str, blob: Blob) -> torch.Tensor:
        """The raw bytes of a ``torch.save`` blob, decoded once while it stays cached."""
        with self._lock:
            found = self._cache.get(name)
            if found is not None:
                return found
            flight = self._decoding.setdefault(name, threading.Lock())
        with flight:  # one thread decodes a blob; the others wait and take it from the cache
            with self._lock:
                found = self._cache.get(name)
            if found is not None:
                return found
            data = bytearray(blob.length)
            self._files.read_into(blob.file, blob.offset, memoryview(data))
            decoded = decode_tensor_blob(data, blob.dtype, blob.sizes, f"tensor chunk {name!r}")
            with self._lock:
                self._cache.put(name, decoded)
                self._decoding.pop(name, None)
            return decoded

    def read_into(self, name: str, offset: int, dest: memoryview) -> None:
        t = self._translated()
        view = dest.cast("B") if dest.format != "B" else dest
        blob = t.blobs.get(name)
        if blob is not None:
            source = memoryview(self._decoded(name, blob).numpy())
        elif name in t.memory:
            source = memoryview(t.memory[name])
        elif name in t.metadata.files:  # a DCP data file holding raw bytes: read in place
            self._files.read_into(name, offset, dest)
            return
        else:
            raise CorruptCheckpointError(
                f"{name!r} is not a file of the DCP checkpoint {self.checkpoint_id!r}"
            )
        if offset < 0 or offset + len(view) > len(source):
            raise CorruptCheckpointError(
                f"read of {len(view)} bytes at {offset} is outside {name!r} "
                f"({len(source)} bytes) of the DCP checkpoint {self.checkpoint_id!r}"
            )
        view[:] = source[offset : offset + len(view)]

    def file_size(self, name: str) -> int | None:
        t = self._translated()
        if name in t.blobs:
            return None  # known only once decoded
        if name in t.memory:
            return len(t.memory[name])
        return self._files.file_size(name)

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
        self._files.close()


__all__ = ["DEFAULT_CACHE_BYTES", "DcpReader", "is_dcp_checkpoint"]
