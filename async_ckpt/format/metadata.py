"""The checkpoint metadata: frozen dataclasses and their canonical JSON encoding.

The metadata is the commit record of a checkpoint (see docs/FORMAT.md).
:mod:`.decode` is its strict decoder, :mod:`.seal` its own checksum.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..gc_pause import gc_paused
from .checksum import ALGORITHM
from .seal import PLACEHOLDER as SEAL_PLACEHOLDER
from .seal import seal_metadata

FORMAT_NAME = "async_ckpt"
FORMAT_VERSION = 2
DIGEST_VERSION = 3
# Version 1 lacks the metadata's own checksum; it is still read (docs/FORMAT.md, section 7).
# Version 3 adds content digests to chunks; only saves that record them write it, so
# full saves stay readable by releases that read up to version 2.
READABLE_VERSIONS = (1, 2, 3)
PathComponent = str | int
KeyPath = tuple[PathComponent, ...]


@dataclass(frozen=True)
class Chunk:
    """One stored rectangular piece of a tensor: where it sits in the tensor and in a file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    nbytes: int
    checksums: tuple[int, ...]
    digest: str | None = None  # XXH3-128 of the bytes, hex; incremental saves only (version 3)


@dataclass(frozen=True)
class TensorEntry:
    """A tensor (or numpy array, ``numpy=True``) stored as one or more chunks."""

    path: KeyPath
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    numpy: bool = False


@dataclass(frozen=True)
class ValueEntry:
    """A plain value kept inside the metadata as JSON (see ``objects.encode_plain``)."""

    path: KeyPath
    value: dict[str, Any]


@dataclass(frozen=True)
class ObjectEntry:
    """Any other picklable object, pickled into a data file and read back allow-listed."""

    path: KeyPath
    type_name: str
    file: str
    offset: int
    nbytes: int
    checksums: tuple[int, ...]


Entry = TensorEntry | ValueEntry | ObjectEntry


@dataclass(frozen=True)
class Metadata:
    """Everything a reader needs: the entries, the containers around them, the files."""

    save_id: str
    world_size: int
    block_size: int
    files: dict[str, int]
    containers: dict[str, str]
    entries: Mapping[str, Entry]  # a dict, or the committed bytes decoded on use (EncodedEntries)
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Bytes of all data files together."""
        return sum(self.files.values())

    @property
    def incremental(self) -> dict[str, Any] | None:
        """What an incremental save shared: ``{"base", "new_bytes", "shared_bytes",
        "shared_files"}`` (kept in ``extra["incremental"]``), None for other saves."""
        info = self.extra.get("incremental")
        return info if isinstance(info, dict) else None

    @property
    def new_bytes(self) -> int:
        """Bytes of the data files this save wrote: all of them unless it shared some."""
        info = self.incremental
        value = info.get("new_bytes") if info else None
        return value if type(value) is int else self.total_bytes


# ---------------------------------------------------------------------------- encode


def _encode_chunk(c: Chunk) -> dict[str, Any]:
    out = {
        "offsets": list(c.offsets),
        "sizes": list(c.sizes),
        "file": c.file,
        "offset": c.offset,
        "nbytes": c.nbytes,
        "checksums": list(c.checksums),
    }
    if c.digest is not None:
        out["digest"] = c.digest
    return out


def _encode_entry(entry: Entry) -> dict[str, Any]:
    if isinstance(entry, TensorEntry):
        out: dict[str, Any] = {
            "kind": "ndarray" if entry.numpy else "tensor",
            "path": list(entry.path),
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "chunks": [_encode_chunk(c) for c in entry.chunks],
        }
        return out
    if isinstance(entry, ValueEntry):
        return {"kind": "value", "path": list(entry.path), "value": entry.value}
    return {
        "kind": "object",
        "path": list(entry.path),
        "type_name": entry.type_name,
        "file": entry.file,
        "offset": entry.offset,
        "nbytes": entry.nbytes,
        "checksums": list(entry.checksums),
    }


def encode_metadata(meta: Metadata) -> bytes:
    """The metadata file's bytes: canonical JSON (sorted keys), ASCII, self-checksummed."""
    with gc_paused():  # a dict per entry and chunk, no cycles: see decode_metadata
        return _encode(meta)


def _encode(meta: Metadata) -> bytes:
    checksum: dict[str, Any] = {"algorithm": ALGORITHM, "block_size": meta.block_size}
    if meta.version >= 2:
        checksum["metadata"] = SEAL_PLACEHOLDER.decode()
    doc = {
        "format": FORMAT_NAME,
        "version": meta.version,
        "save_id": meta.save_id,
        "world_size": meta.world_size,
        "checksum": checksum,
        "files": {name: {"size": size} for name, size in sorted(meta.files.items())},
        "containers": dict(sorted(meta.containers.items())),
        "entries": {key: _encode_entry(e) for key, e in sorted(meta.entries.items())},
        "extra": meta.extra,
    }
    data = (
        json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")
        + b"\n"
    )
    return data if meta.version < 2 else seal_metadata(data)
