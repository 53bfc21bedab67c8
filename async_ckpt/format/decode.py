"""The strict decoder of the metadata file: exactly the documented schema, or an error.

Unknown fields, wrong types, file names that could leave the checkpoint, and
ranges that do not fit their file are all :class:`~async_ckpt.errors.MetadataError`;
a damaged file is :class:`~async_ckpt.errors.MetadataChecksumError`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import MetadataChecksumError, MetadataError
from ..gc_pause import gc_paused
from .checksum import ALGORITHM, block_count
from .dtypes import dtype_from_name, itemsize
from .metadata import (
    DIGEST_VERSION,
    FORMAT_NAME,
    READABLE_VERSIONS,
    Chunk,
    Entry,
    KeyPath,
    Metadata,
    ObjectEntry,
    TensorEntry,
    ValueEntry,
)
from .names import is_safe_file_name
from .seal import verify_self_checksum

MAX_METADATA_BYTES = 512 * 1024 * 1024
"""The largest metadata file a reader accepts (a bound on what a hostile file costs)."""
_MAX_DIMS = 64
_MAX_INT = 2**62


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
    # A plain loop: most of these lists hold one to four numbers, where a generator
    # and min/max calls cost more than the checks themselves.
    for v in value:
        if type(v) is not int or not minimum <= v <= _MAX_INT:
            break
    else:
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
    # every name in ``files`` passed is_safe_file_name already: one dict lookup per chunk
    if type(name) is not str or name not in files:
        if not is_safe_file_name(name):
            raise _fail(
                f"{_loc(where)}.file {name!r} is not a plain file name inside the checkpoint"
            )
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
_DIGESTED_CHUNK_FIELDS = _CHUNK_FIELDS | {"digest"}
_HEX = frozenset("0123456789abcdef")


def _is_digest(value: Any) -> bool:
    return type(value) is str and len(value) == 32 and _HEX.issuperset(value)


def _digest(value: Any, where: Where) -> str:
    if not _is_digest(value):
        raise _fail(f"{_loc(where)}.digest must be 32 lowercase hex digits (XXH3-128)")
    return value


def _whole_chunk(
    raw: Any, shape: tuple, size: int, files: dict[str, int], block_size: int, digests: bool
) -> Chunk | None:
    """The single chunk of a tensor stored whole (most tensors), checked in one pass.

    The same rules as the general path below, with fewer calls: at 100k tensors
    this runs before every commit and on every load. None when the chunk is not
    a whole-tensor chunk or breaks any rule; the general path then checks it and
    names what is wrong.
    """
    if type(raw) is not dict:
        return None
    keys = raw.keys()
    if not (keys == _CHUNK_FIELDS or (digests and keys == _DIGESTED_CHUNK_FIELDS)):
        return None
    offsets, sizes = raw["offsets"], raw["sizes"]
    if type(offsets) is not list or type(sizes) is not list:
        return None
    if len(offsets) != len(shape) or len(sizes) != len(shape):
        return None
    for o, s, d in zip(offsets, sizes, shape, strict=True):
        if type(o) is not int or o != 0 or type(s) is not int or s != d:
            return None
    name, offset, nbytes = raw["file"], raw["offset"], raw["nbytes"]
    if type(name) is not str or type(offset) is not int or type(nbytes) is not int:
        return None
    limit = files.get(name)
    if limit is None or nbytes != math.prod(shape) * size or not 0 <= offset <= _MAX_INT:
        return None
    if nbytes > _MAX_INT or offset + nbytes > limit:
        return None
    sums = raw["checksums"]
    if type(sums) is not list or len(sums) != block_count(nbytes, block_size):
        return None
    for c in sums:
        if type(c) is not int or not 0 <= c < 2**32:
            return None
    digest = raw.get("digest")
    if digest is not None and not _is_digest(digest):
        return None
    return Chunk((0,) * len(shape), shape, name, offset, nbytes, tuple(sums), digest)


def _decode_tensor(
    doc: dict, where: str, files: dict[str, int], block_size: int, digests: bool
) -> TensorEntry:
    doc = _obj(doc, where, _TENSOR_FIELDS)
    dtype = dtype_from_name(doc["dtype"])
    shape = _ints(doc["shape"], (where, ".shape"))
    size = itemsize(dtype)
    raw_chunks = doc["chunks"]
    if type(raw_chunks) is list and len(raw_chunks) == 1:
        whole = _whole_chunk(raw_chunks[0], shape, size, files, block_size, digests)
        if whole is not None:
            path = _path(doc["path"], where)
            return TensorEntry(path, doc["dtype"], shape, (whole,), doc["kind"] == "ndarray")
    if not isinstance(doc["chunks"], list) or len(doc["chunks"]) > 1_000_000:
        raise _fail(f"{where}.chunks must be a list")
    chunks = []
    zeros, volume = (0,) * len(shape), 0
    for i, raw in enumerate(doc["chunks"]):
        cw = (where, ".chunks[", i, "]")
        if not (digests and type(raw) is dict and raw.keys() == _DIGESTED_CHUNK_FIELDS):
            # a digest only from version 3 on
            raw = _obj(raw, cw, _CHUNK_FIELDS, {"digest"} if digests else set())
        offsets = _ints(raw["offsets"], (*cw, ".offsets"))
        sizes = _ints(raw["sizes"], (*cw, ".sizes"))
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise _fail(f"{_loc(cw)} has {len(offsets)}-d offsets for a {len(shape)}-d tensor")
        if offsets != zeros or sizes != shape:  # else the whole tensor: inside by definition
            for o, s, d in zip(offsets, sizes, shape, strict=True):
                if o + s > d:
                    raise _fail(f"{_loc(cw)} lies outside the tensor's shape {list(shape)}")
        name, offset, nbytes = _file_ref(raw, cw, files)
        elements = math.prod(sizes)
        volume += elements
        if nbytes != elements * size:
            raise _fail(f"{_loc(cw)}.nbytes {nbytes} does not match sizes {list(sizes)} of {dtype}")
        sums = _checksums(raw["checksums"], (*cw, ".checksums"), nbytes, block_size)
        digest = _digest(raw["digest"], cw) if "digest" in raw else None
        chunks.append(Chunk(offsets, sizes, name, offset, nbytes, sums, digest))
    # Chunks lie inside the shape (checked above); equal volume and no overlap mean
    # every element is written exactly once.
    if volume != math.prod(shape):
        raise _fail(f"{where}.chunks do not cover the tensor's shape {list(shape)} exactly")
    _check_disjoint(chunks, where)
    return TensorEntry(
        path=_path(doc["path"], where),
        dtype=doc["dtype"],
        shape=shape,
        chunks=tuple(chunks),
        numpy=doc["kind"] == "ndarray",
    )


def _decode_entry(
    doc: Any, where: str, files: dict[str, int], block_size: int, digests: bool
) -> Entry:
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind in ("tensor", "ndarray"):
        return _decode_tensor(doc, where, files, block_size, digests)
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
    # Parsing makes an object per JSON value and none of them cycles: collections
    # triggered by that many allocations would re-traverse the heap for nothing
    # (3x the parse time at 100k entries).
    with gc_paused():
        return _decode(data)


def _decode(data: bytes) -> Metadata:
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
        key: _decode_entry(raw, f"entries[{key!r}]", files, block_size, version >= DIGEST_VERSION)
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
