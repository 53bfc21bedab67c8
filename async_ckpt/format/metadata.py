"""The checkpoint metadata: frozen dataclasses, and their strict JSON codec.

The metadata is the commit record of a checkpoint (see docs/FORMAT.md). The
decoder accepts exactly the documented schema: unknown fields, wrong types,
file names that could leave the checkpoint, and ranges that do not fit their
file are all :class:`~async_ckpt.errors.MetadataError`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import crc32c

from ..errors import MetadataChecksumError, MetadataError
from .checksum import ALGORITHM, block_count
from .dtypes import dtype_from_name, itemsize

FORMAT_NAME = "async_ckpt"
FORMAT_VERSION = 2
# Version 1 lacks the metadata's own checksum; it is still read (docs/FORMAT.md, section 7).
READABLE_VERSIONS = (1, 2)
METADATA_FILE = "metadata.json"
MAX_METADATA_BYTES = 512 * 1024 * 1024
_MAX_DIMS = 64
_MAX_INT = 2**62

_SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")

PathComponent = str | int
KeyPath = tuple[PathComponent, ...]


def is_safe_file_name(name: object) -> bool:
    """A data-file name is one plain path component: no separators, no ``..``."""
    return isinstance(name, str) and bool(_SAFE_FILE_NAME.fullmatch(name)) and ".." not in name


@dataclass(frozen=True)
class Chunk:
    """One stored rectangular piece of a tensor: where it sits in the tensor and in a file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    nbytes: int
    checksums: tuple[int, ...]


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
    entries: dict[str, Entry]
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Bytes of all data files together."""
        return sum(self.files.values())


# ---------------------------------------------------------------------------- encode


def _encode_entry(entry: Entry) -> dict[str, Any]:
    if isinstance(entry, TensorEntry):
        out: dict[str, Any] = {
            "kind": "ndarray" if entry.numpy else "tensor",
            "path": list(entry.path),
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "chunks": [
                {
                    "offsets": list(c.offsets),
                    "sizes": list(c.sizes),
                    "file": c.file,
                    "offset": c.offset,
                    "nbytes": c.nbytes,
                    "checksums": list(c.checksums),
                }
                for c in entry.chunks
            ],
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


# The metadata's own checksum: CRC-32C of the file's bytes with these 8 hex digits
# zeroed. The encoder writes "checksum" as the first top-level key and "metadata"
# as its last field, so the first occurrence of the pattern is this field; the
# decoder also checks that the parsed field holds the digits it verified.
_SELF_CHECKSUM = re.compile(rb'"metadata":"([0-9a-f]{8})"')
_SELF_CHECKSUM_PLACEHOLDER = b"0" * 8


def _self_checksum(data: bytes, start: int) -> int:
    """CRC-32C of ``data`` with the 8 digits at ``start`` read as zeros."""
    crc = crc32c.crc32c(data[:start])
    crc = crc32c.crc32c(_SELF_CHECKSUM_PLACEHOLDER, crc)
    return crc32c.crc32c(data[start + 8 :], crc)


def seal_metadata(data: bytes) -> bytes:
    """``data`` with its ``checksum.metadata`` field set to the checksum of the result."""
    found = _SELF_CHECKSUM.search(data)
    if found is None:
        raise ValueError("the metadata has no checksum.metadata field to seal")
    start = found.start(1)
    return data[:start] + f"{_self_checksum(data, start):08x}".encode() + data[start + 8 :]


def encode_metadata(meta: Metadata) -> bytes:
    """The metadata file's bytes: canonical JSON (sorted keys), ASCII, self-checksummed."""
    checksum: dict[str, Any] = {"algorithm": ALGORITHM, "block_size": meta.block_size}
    if meta.version >= 2:
        checksum["metadata"] = _SELF_CHECKSUM_PLACEHOLDER.decode()
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


def verify_self_checksum(data: bytes) -> str | None:
    """Check the metadata's own checksum; returns its digits, None if it has none.

    Raises :class:`MetadataChecksumError` when the bytes do not match it.
    """
    found = _SELF_CHECKSUM.search(data)
    if found is None:
        return None
    if _self_checksum(data, found.start(1)) != int(found.group(1), 16):
        raise MetadataChecksumError(
            f"the checkpoint's {METADATA_FILE} does not match its own checksum: the file is "
            "damaged (a changed byte could alter loaded values). Load an earlier checkpoint."
        )
    return found.group(1).decode()


# ---------------------------------------------------------------------------- decode


def _fail(what: str) -> MetadataError:
    return MetadataError(f"invalid checkpoint metadata: {what}")


# Where a field sits, for error messages: a string, or a tuple of parts joined only
# when an error is raised (the decoder runs per chunk of every load: no eager f-strings).
Where = str | tuple


def _loc(where: Where) -> str:
    return where if isinstance(where, str) else "".join(str(p) for p in where)


def _obj(value: Any, where: Where, keys: set[str], optional: set[str] = frozenset()) -> dict:
    if type(value) is dict and value.keys() == keys:
        return value  # the common case, checked in one comparison
    where = _loc(where)
    if not isinstance(value, dict):
        raise _fail(f"{where} must be an object")
    unknown = set(value) - keys - optional
    missing = keys - set(value)
    if unknown:
        raise _fail(f"{where} has unknown fields {sorted(unknown)}")
    if missing:
        raise _fail(f"{where} lacks fields {sorted(missing)}")
    return value


def _int(value: Any, where: Where, *, minimum: int = 0) -> int:
    if type(value) is not int or not minimum <= value <= _MAX_INT:  # bool is not int here
        raise _fail(f"{_loc(where)} must be an integer in [{minimum}, 2**62], got {value!r}")
    return value


def _ints(value: Any, where: Where, *, max_len: int = _MAX_DIMS, minimum: int = 0) -> tuple:
    if not isinstance(value, list) or len(value) > max_len:
        raise _fail(f"{_loc(where)} must be a list of at most {max_len} integers")
    if all(type(v) is int for v in value) and (
        not value or (min(value) >= minimum and max(value) <= _MAX_INT)
    ):
        return tuple(value)
    where = _loc(where)
    return tuple(_int(v, f"{where}[{i}]", minimum=minimum) for i, v in enumerate(value))


def _checksums(value: Any, where: Where, nbytes: int, block_size: int) -> tuple[int, ...]:
    expected = block_count(nbytes, block_size)
    sums = _ints(value, where, max_len=expected)
    if len(sums) != expected or (sums and max(sums) >= 2**32):
        raise _fail(f"{_loc(where)} must hold {expected} 32-bit checksums")
    return sums


def _file_ref(doc: dict, where: Where, files: dict[str, int]) -> tuple[str, int, int]:
    name = doc["file"]
    if not is_safe_file_name(name):
        raise _fail(f"{_loc(where)}.file {name!r} is not a plain file name inside the checkpoint")
    if name not in files:
        raise _fail(f"{_loc(where)}.file {name!r} is not listed in 'files'")
    offset = _int(doc["offset"], (where, ".offset"))
    nbytes = _int(doc["nbytes"], (where, ".nbytes"))
    if offset + nbytes > files[name]:
        raise _fail(f"{_loc(where)} range [{offset}, {offset + nbytes}) exceeds {name}'s size")
    return name, offset, nbytes


def _path(value: Any, where: str) -> KeyPath:
    if not isinstance(value, list) or len(value) > 256:
        raise _fail(f"{where}.path must be a list of keys")
    for part in value:
        if not isinstance(part, (str, int)) or isinstance(part, bool):
            raise _fail(f"{where}.path holds {part!r}, which is neither str nor int")
    return tuple(value)


_TENSOR_FIELDS = frozenset({"kind", "path", "dtype", "shape", "chunks"})
_CHUNK_FIELDS = frozenset({"offsets", "sizes", "file", "offset", "nbytes", "checksums"})


def _decode_tensor(doc: dict, where: str, files: dict[str, int], block_size: int) -> TensorEntry:
    doc = _obj(doc, where, _TENSOR_FIELDS)
    dtype = dtype_from_name(doc["dtype"])
    shape = _ints(doc["shape"], (where, ".shape"))
    size = itemsize(dtype)
    if not isinstance(doc["chunks"], list) or len(doc["chunks"]) > 1_000_000:
        raise _fail(f"{where}.chunks must be a list")
    chunks = []
    for i, raw in enumerate(doc["chunks"]):
        cw = (where, ".chunks[", i, "]")
        raw = _obj(raw, cw, _CHUNK_FIELDS)
        offsets = _ints(raw["offsets"], (*cw, ".offsets"))
        sizes = _ints(raw["sizes"], (*cw, ".sizes"))
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise _fail(f"{_loc(cw)} has {len(offsets)}-d offsets for a {len(shape)}-d tensor")
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            raise _fail(f"{_loc(cw)} lies outside the tensor's shape {list(shape)}")
        name, offset, nbytes = _file_ref(raw, cw, files)
        if nbytes != math.prod(sizes) * size:
            raise _fail(f"{_loc(cw)}.nbytes {nbytes} does not match sizes {list(sizes)} of {dtype}")
        sums = _checksums(raw["checksums"], (*cw, ".checksums"), nbytes, block_size)
        chunks.append(Chunk(offsets, sizes, name, offset, nbytes, sums))
    # Chunks lie inside the shape (checked above); equal volume and no overlap mean
    # every element is written exactly once.
    if sum(math.prod(c.sizes) for c in chunks) != math.prod(shape):
        raise _fail(f"{where}.chunks do not cover the tensor's shape {list(shape)} exactly")
    _check_disjoint(chunks, where)
    return TensorEntry(
        path=_path(doc["path"], where),
        dtype=doc["dtype"],
        shape=shape,
        chunks=tuple(chunks),
        numpy=doc["kind"] == "ndarray",
    )


def _decode_entry(doc: Any, where: str, files: dict[str, int], block_size: int) -> Entry:
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind in ("tensor", "ndarray"):
        return _decode_tensor(doc, where, files, block_size)
    if kind == "value":
        doc = _obj(doc, where, {"kind", "path", "value"})
        from .objects import decode_plain  # validate now, decode at load

        if not isinstance(doc["value"], dict) or not isinstance(doc["value"].get("type"), str):
            raise _fail(f"{where}.value must be an object with a string 'type'")
        decode_plain(doc["value"])
        return ValueEntry(_path(doc["path"], where), doc["value"])
    if kind == "object":
        doc = _obj(
            doc, where, {"kind", "path", "type_name", "file", "offset", "nbytes", "checksums"}
        )
        name, offset, nbytes = _file_ref(doc, where, files)
        if not isinstance(doc["type_name"], str):
            raise _fail(f"{where}.type_name must be a string")
        sums = _checksums(doc["checksums"], f"{where}.checksums", nbytes, block_size)
        return ObjectEntry(_path(doc["path"], where), doc["type_name"], name, offset, nbytes, sums)
    raise _fail(f"{where} has unknown kind {kind!r}")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid in metadata (the encoder never writes it)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys in a JSON object")
    return out


def _check_disjoint(chunks: list[Chunk], where: str) -> None:
    """Chunks must not overlap: an overlap leaves other elements of the tensor unwritten."""
    if len(chunks) < 2:
        return
    ordered = sorted(chunks, key=lambda c: c.offsets)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if a.offsets and b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break  # sorted by dim 0: no later chunk can reach back into a
            if all(
                bo < ao + asz and ao < bo + bsz
                for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
            ):
                raise _fail(
                    f"{where} has overlapping chunks at {list(a.offsets)} and {list(b.offsets)}"
                )


def listed_files(data: bytes) -> set[str]:
    """The data-file names a metadata file lists, without decoding its entries.

    For deleting what a commit replaced: only its own checksum and the JSON are
    checked (an entry-by-entry decode of 100k entries costs seconds); names that
    are not plain file names are left out. Raises :class:`MetadataError`.
    """
    if len(data) > MAX_METADATA_BYTES:
        raise _fail(f"metadata is {len(data)} bytes, above the {MAX_METADATA_BYTES} limit")
    verify_self_checksum(data)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _fail(f"not JSON ({exc})") from exc
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        raise _fail("files must be an object")
    return {name for name in files if is_safe_file_name(name)}


def decode_metadata(data: bytes) -> Metadata:
    """Parse and validate a metadata file; any defect raises :class:`MetadataError`."""
    if len(data) > MAX_METADATA_BYTES:
        raise _fail(f"metadata is {len(data)} bytes, above the {MAX_METADATA_BYTES} limit")
    verified_digits = verify_self_checksum(data)
    try:
        doc = json.loads(
            data.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_unique_keys
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, 5000-digit ints
        raise _fail(f"not JSON ({exc}); the file is truncated, damaged or not ours") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise _fail(f"not an {FORMAT_NAME} metadata file (missing 'format': '{FORMAT_NAME}')")
    version = doc.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise MetadataError(
            f"checkpoint format version {version!r} is not supported by this async_ckpt "
            f"(it reads versions {list(READABLE_VERSIONS)}); upgrade async_ckpt to load it"
        )
    doc = _obj(
        doc,
        "metadata",
        {
            "format",
            "version",
            "save_id",
            "world_size",
            "checksum",
            "files",
            "containers",
            "entries",
        },
        {"extra"},
    )
    if not isinstance(doc["save_id"], str) or not is_safe_file_name(doc["save_id"]):
        raise _fail("save_id must be a plain token")
    world_size = _int(doc["world_size"], "world_size", minimum=1)
    # From version 2 on the metadata checksums itself; a version-2 file without the
    # field is refused, so a damaged file cannot pass as unchecked.
    self_field = {"metadata"} if version >= 2 else set()
    checksum = _obj(doc["checksum"], "checksum", {"algorithm", "block_size", *self_field})
    if version >= 2 and checksum["metadata"] != verified_digits:
        raise MetadataChecksumError(
            "invalid checkpoint metadata: checksum.metadata is not the checksum that was verified"
        )
    if checksum["algorithm"] != ALGORITHM:
        raise _fail(f"checksum algorithm {checksum['algorithm']!r} is not {ALGORITHM!r}")
    block_size = _int(checksum["block_size"], "checksum.block_size", minimum=4096)
    if not isinstance(doc["files"], dict):
        raise _fail("files must be an object")
    files: dict[str, int] = {}
    for name, info in doc["files"].items():
        if not is_safe_file_name(name):
            raise _fail(f"file name {name!r} could resolve outside the checkpoint")
        files[name] = _int(_obj(info, f"files[{name!r}]", {"size"})["size"], f"{name}.size")
    containers = doc["containers"]
    if not isinstance(containers, dict) or any(
        not isinstance(k, str) or v not in ("dict", "list", "tuple") for k, v in containers.items()
    ):
        raise _fail("containers must map keys to 'dict', 'list' or 'tuple'")
    if not isinstance(doc["entries"], dict):
        raise _fail("entries must be an object")
    entries = {
        key: _decode_entry(raw, f"entries[{key!r}]", files, block_size)
        for key, raw in doc["entries"].items()
    }
    for key, entry in entries.items():
        if ".".join(str(p) for p in entry.path) != key:
            raise _fail(f"entries[{key!r}].path {list(entry.path)} does not spell its key")
    extra = doc.get("extra", {})
    if not isinstance(extra, dict):
        raise _fail("extra must be an object")
    return Metadata(
        save_id=doc["save_id"],
        world_size=world_size,
        block_size=block_size,
        files=files,
        containers=dict(containers),
        entries=entries,
        version=version,
        extra=extra,
    )
