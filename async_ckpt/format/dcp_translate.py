"""A decoded DCP checkpoint in our model: entries, containers, and where their bytes are.

:func:`translate` turns :class:`~.dcp.DcpMetadata`, together with what the
reader found in the data files (decoded byte entries, safetensors headers),
into our :class:`~.metadata.Metadata`. A tensor chunk DCP stored as a
``torch.save`` blob gets a synthetic file of its own (``<file>-<offset>.tensor``,
the chunk's raw bytes from offset 0), so the loader's partial reads (row
ranges, when resharding) address raw bytes as in our format; raw (safetensors)
chunks keep their real file and offset. Byte entries are opened up into our
containers and leaves (``<file>-<offset>.value`` holds the bytes of their
tensors and pickled objects). Paths come from DCP's ``planner_data``. Pure
data, no I/O: the reader (``storage/dcp.py``) does the reads.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MetadataError, UnsafeObjectError
from .dcp import DcpMetadata, DcpTensor
from .dtypes import dtype_from_name, itemsize
from .metadata import (
    FORMAT_VERSION,
    Chunk,
    Entry,
    KeyPath,
    Metadata,
    ObjectEntry,
    TensorEntry,
    ValueEntry,
)
from .objects import PLAIN_TYPES, dumps_object, encode_plain, fits_inline

SOURCE_FORMAT = "torch.distributed.checkpoint"
"""``Metadata.extra["source_format"]`` of a translated DCP checkpoint."""

_MAX_PATH = 256
# Translated metadata has no checksums; the loader rounds reads to blocks only when
# verifying, so the smallest block keeps raw (safetensors) reads close to what is needed.
_BLOCK_SIZE = 4096
_RANK_FILE = re.compile(r"^__(\d+)_(\d+)\.distcp$")


def _fail(what: str) -> MetadataError:
    return MetadataError(f"invalid DCP checkpoint: {what}")


@dataclass(frozen=True)
class RawTensor:
    """A tensor stored as raw bytes (DCP's safetensors serialization), from the file's header."""

    dtype: str
    shape: tuple[int, ...]
    offset: int  # of its first byte in the data file
    nbytes: int
    saved_offsets: tuple[int, ...] | None  # its place in the whole tensor, where DCP noted it


@dataclass(frozen=True)
class Refused:
    """A byte entry whose value needs a global that is not allow-listed (``module.name``)."""

    name: str


@dataclass(frozen=True)
class Blob:
    """A tensor chunk DCP stored with ``torch.save``: where, and what it must decode to."""

    file: str
    offset: int
    length: int
    dtype: str
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class Translation:
    """A DCP checkpoint in our model, and where the bytes of its synthetic files come from.

    ``blobs``: synthetic file -> the ``torch.save`` blob holding its bytes;
    ``memory``: synthetic file -> bytes built from decoded byte entries. Other
    files in ``metadata.files`` are DCP's own data files, read as they are.
    """

    metadata: Metadata
    blobs: dict[str, Blob] = field(default_factory=dict)
    memory: dict[str, bytes] = field(default_factory=dict)


def is_translated_dcp(meta: Metadata) -> bool:
    """Whether ``meta`` was translated from a DCP checkpoint (it has no checksums)."""
    return meta.extra.get("source_format") == SOURCE_FORMAT


def raw_groups(dcp: DcpMetadata) -> set[tuple[str, int]]:
    """The (file, offset) places holding raw tensor bytes behind a safetensors header.

    DCP's safetensors serialization records each tensor's raw length, at the
    offset where the file's safetensors document starts; a ``torch.save`` blob
    is always longer than its tensor's bytes (its zip framing).
    """
    found = set()
    for fqn, tensor in dcp.tensors.items():
        size = itemsize(dtype_from_name(tensor.dtype))
        for offsets, sizes in tensor.chunks:
            where = dcp.storage.get((fqn, offsets))
            if where is not None and where.length == math.prod(sizes) * size:
                found.add((where.file, where.offset))
    return found


def _key(path: KeyPath) -> str:
    return ".".join(str(p) for p in path)


def refusal_payload(name: str) -> bytes:
    """An object payload that our unpickler refuses, naming ``name`` (a deferred refusal).

    A pickle that only looks up the global: refused while it is not allow-listed,
    and never a value (there is no STOP) even once it is.
    """
    module, _, attr = name.replace("\n", " ").rpartition(".")
    return f"c{module or 'builtins'}\n{attr}\n".encode("utf-8", "replace")


class _Builder:
    """Collects entries, container kinds and synthetic files while translating."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.kinds: dict[str, str] = {"": "dict"}  # containers whose kind is known
        self.files: dict[str, int] = {}
        self.blobs: dict[str, Blob] = {}
        self.memory: dict[str, bytes] = {}

    def add(self, entry: Entry) -> None:
        key = _key(entry.path)
        if key in self.entries:
            raise _fail(f"two entries have the flat key {key!r}")
        self.entries[key] = entry


def _tensor_entry(
    b: _Builder,
    fqn: str,
    path: KeyPath,
    tensor: DcpTensor,
    dcp: DcpMetadata,
    raw: Mapping[tuple[str, int], Mapping[str, RawTensor]],
) -> None:
    size = itemsize(dtype_from_name(tensor.dtype))
    chunks = []
    for offsets, sizes in tensor.chunks:
        nbytes = math.prod(sizes) * size
        where = dcp.storage.get((fqn, offsets))
        if where is None:
            raise _fail(f"chunk {list(offsets)} of tensor {fqn!r} has no storage_data entry")
        if where.length == nbytes:  # raw bytes behind a safetensors header
            found = raw.get((where.file, where.offset), {}).get(fqn)
            if found is None or (found.dtype, found.shape, found.nbytes) != (
                tensor.dtype,
                sizes,
                nbytes,
            ):
                raise _fail(f"the safetensors data of {fqn!r} in {where.file} does not match it")
            if found.saved_offsets is not None and found.saved_offsets != offsets:
                raise _fail(
                    f"{where.file} holds {fqn!r} at {list(found.saved_offsets)}, "
                    f"not {list(offsets)}"
                )
            b.files[where.file] = max(b.files.get(where.file, 0), found.offset + nbytes)
            chunks.append(Chunk(offsets, sizes, where.file, found.offset, nbytes, ()))
            continue
        name = f"{where.file}-{where.offset}.tensor"
        blob = Blob(where.file, where.offset, where.length, tensor.dtype, sizes)
        if b.blobs.setdefault(name, blob) != blob:
            raise _fail(f"two chunks claim the bytes at {where.offset} of {where.file}")
        b.files[name] = nbytes
        chunks.append(Chunk(offsets, sizes, name, 0, nbytes, ()))
    if sum(math.prod(s) for _, s in tensor.chunks) != math.prod(tensor.shape):
        raise _fail(f"the chunks of {fqn!r} do not cover its shape {list(tensor.shape)} exactly")
    _check_disjoint(tensor.chunks, fqn)
    b.add(TensorEntry(path, tensor.dtype, tensor.shape, tuple(chunks)))


def _check_disjoint(boxes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...], fqn: str) -> None:
    ordered = sorted(boxes)
    for i, (a_off, a_size) in enumerate(ordered):
        for b_off, b_size in ordered[i + 1 :]:
            if a_off and b_off[0] >= a_off[0] + a_size[0]:
                break  # sorted by the first dimension: no later box reaches back
            if all(
                bo < ao + asz and ao < bo + bsz
                for ao, asz, bo, bsz in zip(a_off, a_size, b_off, b_size, strict=True)
            ):
                raise _fail(
                    f"tensor {fqn!r} has overlapping chunks at {list(a_off)}, {list(b_off)}"
                )


class _Pieces:
    """The bytes of one synthetic in-memory file, appended piece by piece."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> int:
        self.parts.append(data)
        self.size += len(data)
        return self.size - len(data)


def _expand(b: _Builder, path: KeyPath, value: Any, pieces: _Pieces) -> None:
    """Turn a decoded byte entry into our entries: containers are opened up, tensors get
    raw bytes, plain values stay in the metadata, other objects are pickled allow-listed."""
    kind = type(value)
    if len(path) < _MAX_PATH and (kind in (list, tuple) or kind is torch.Size):
        b.kinds[_key(path)] = "list" if kind is list else "tuple"
        for i, item in enumerate(value):
            _expand(b, (*path, i), item, pieces)
    elif (
        len(path) < _MAX_PATH
        and kind in (dict, collections.OrderedDict)
        and all(type(k) in (str, int) for k in value)
    ):
        b.kinds[_key(path)] = "dict"
        for k, item in value.items():
            _expand(b, (*path, k), item, pieces)
    elif isinstance(value, Refused):
        payload = refusal_payload(value.name)
        b.add(ObjectEntry(path, value.name, pieces.name, pieces.add(payload), len(payload), ()))
    elif isinstance(value, torch.Tensor) and value.layout == torch.strided:
        flat = value.detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        name = str(value.dtype).removeprefix("torch.")
        dtype_from_name(name)
        shape = tuple(value.shape)
        chunk = Chunk((0,) * len(shape), shape, pieces.name, pieces.add(data), len(data), ())
        b.add(TensorEntry(path, name, shape, (chunk,)))
    elif kind in PLAIN_TYPES and fits_inline(value):
        b.add(ValueEntry(path, encode_plain(value)))
    else:
        type_name = f"{kind.__module__}.{kind.__qualname__}"
        try:
            payload = dumps_object(value)
        except UnsafeObjectError:  # not allow-listed here: refused when (if) it is loaded
            payload = refusal_payload(type_name)
        b.add(ObjectEntry(path, type_name, pieces.name, pieces.add(payload), len(payload), ()))


def _optimizer_int_keys(b: _Builder) -> None:
    """Give torch.optim state dicts back their integer parameter ids.

    DCP turns every dict key into a string, so ``optim.state_dict()["state"][0]``
    comes back under ``"0"``; an optimizer given that loses its state silently.
    Where ``<p>.param_groups.<i>.params`` lists integer ids, the keys of
    ``<p>.state`` that spell one of them become that integer again.
    """
    ids: dict[KeyPath, set[int]] = {}
    for entry in b.entries.values():
        p = entry.path
        if (
            len(p) >= 4
            and p[-4:-3] == ("param_groups",)
            and p[-2] == "params"
            and isinstance(entry, ValueEntry)
            and entry.value.get("type") == "int"
        ):
            ids.setdefault(p[:-4], set()).add(entry.value["value"])
    if not ids:
        return
    moved: dict[str, Entry] = {}
    for key, entry in b.entries.items():
        p = entry.path
        for n in range(len(p) - 2, -1, -1):
            prefix = p[:n]
            if prefix in ids and p[n] == "state" and isinstance(p[n + 1], str):
                text = p[n + 1]
                if text.isdigit() and str(int(text)) == text and int(text) in ids[prefix]:
                    p = (*prefix, "state", int(text), *p[n + 2 :])
                    b.kinds[_key((*prefix, "state"))] = "dict"
                break
        moved[key] = entry if p == entry.path else dataclasses.replace(entry, path=p)
    b.entries = moved


def _containers(b: _Builder) -> dict[str, str]:
    """Every container above an entry: known kinds first, else from the keys under it."""
    kinds = dict(b.kinds)
    for entry in b.entries.values():
        for n in range(1, len(entry.path)):
            key = _key(entry.path[:n])
            if key not in b.kinds:  # DCP records ints in a path for list indices only
                index = isinstance(entry.path[n], int)
                kinds[key] = "list" if index and kinds.get(key) != "dict" else "dict"
    clash = sorted(set(kinds) & set(b.entries))
    if clash:
        raise _fail(f"{clash[0]!r} is both a value and a container of values")
    return kinds


def _world_size(files: set[str]) -> int:
    ranks = [int(m.group(1)) for m in map(_RANK_FILE.match, files) if m]
    return max(ranks, default=0) + 1


def translate(
    dcp: DcpMetadata,
    *,
    values: Mapping[str, Any],
    raw: Mapping[tuple[str, int], Mapping[str, RawTensor]],
    file_sizes: Mapping[str, int],
) -> Translation:
    """The DCP checkpoint ``dcp`` as our :class:`Metadata`.

    ``values``: each byte entry's decoded value (a :class:`Refused` where its
    class is not allow-listed); ``raw``: the tensors behind each safetensors
    header of :func:`raw_groups`; ``file_sizes``: the sizes of the DCP data
    files those live in. Raises :class:`MetadataError` for transforms (e.g.
    compression), missing or inconsistent storage records.
    """
    transformed = sorted({t for s in dcp.storage.values() for t in s.transforms})
    if transformed:
        raise MetadataError(
            f"this DCP checkpoint stores its data through stream transforms {transformed} "
            "(e.g. compression), which async_ckpt does not read; load it with "
            "torch.distributed.checkpoint.load and save it again without _extensions"
        )
    b = _Builder()
    for fqn, tensor in dcp.tensors.items():
        _tensor_entry(b, fqn, dcp.paths.get(fqn, (fqn,)), tensor, dcp, raw)
    for fqn in dcp.byte_keys:
        where = dcp.storage.get((fqn, None))
        if where is None or fqn not in values:
            raise _fail(f"byte entry {fqn!r} has no storage_data entry")
        pieces = _Pieces(f"{where.file}-{where.offset}.value")
        _expand(b, dcp.paths.get(fqn, (fqn,)), values[fqn], pieces)
        if pieces.parts:
            b.memory[pieces.name] = b"".join(pieces.parts)
            b.files[pieces.name] = pieces.size
    _optimizer_int_keys(b)
    for name in {
        c.file for e in b.entries.values() if isinstance(e, TensorEntry) for c in e.chunks
    }:
        if name in file_sizes:  # a DCP data file read as it is: its real size
            b.files[name] = file_sizes[name]
    sources = {s.file for s in dcp.storage.values()}
    save_id = "dcp" + re.sub(r"[^A-Za-z0-9]", "", dcp.save_id or "")[:64]
    meta = Metadata(
        save_id=save_id,
        world_size=_world_size(sources),
        block_size=_BLOCK_SIZE,
        files=b.files,
        containers=_containers(b),
        entries={_key(e.path): e for e in b.entries.values()},
        version=FORMAT_VERSION,
        extra={"source_format": SOURCE_FORMAT, "dcp_version": dcp.version},
    )
    return Translation(meta, b.blobs, b.memory)


__all__ = [
    "SOURCE_FORMAT",
    "Blob",
    "RawTensor",
    "Refused",
    "Translation",
    "is_translated_dcp",
    "raw_groups",
    "refusal_payload",
    "translate",
]
