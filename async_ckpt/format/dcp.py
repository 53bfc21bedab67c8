"""torch.distributed.checkpoint (DCP) ``.metadata``: a decoder that runs no code from it.

DCP commits a checkpoint with ``.metadata``, a pickle of its ``Metadata``
dataclass; ``pickle.load`` of such a file runs whatever the file asks for.
:func:`decode_dcp_metadata` resolves only the globals DCP metadata is made of
(its dataclasses, ``torch.Size``, dtypes, layouts, a path) and refuses every
other one with :class:`UnsafeObjectError` naming it. DCP's own classes are
replaced by stand-ins that only keep the state the pickle gives them, so no
DCP code runs either, and the result does not depend on which torch (2.4 on)
wrote it. :mod:`.dcp_translate` turns the result into our model. Pure data, no I/O.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError, MetadataError, UnsafeObjectError
from .dtypes import dtype_from_name
from .metadata import KeyPath
from .names import is_safe_file_name

DCP_METADATA_FILE = ".metadata"
"""The file whose presence makes a directory a DCP checkpoint."""

MAX_DCP_METADATA_BYTES = 512 * 1024 * 1024
"""The largest ``.metadata`` the decoder accepts (a bound on what a hostile file costs)."""

_MAX_INT = 2**62
_MAX_DIMS = 64
_MAX_PATH = 256
_DCP = "torch.distributed.checkpoint"


# ------------------------------------------------------------------- the restricted unpickler


class _Record:
    """A DCP dataclass as the pickle built it: its state is kept, none of DCP's code runs."""

    state: Any = None  # a dataclass whose state is empty gets no BUILD

    def __init__(self) -> None:  # DCP pickles use NEWOBJ; a REDUCE call with arguments fails
        self.state = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __reduce__(self) -> Any:
        raise TypeError("a decoded DCP record is not pickled again")


class _Metadata(_Record):
    pass


class _TensorStorage(_Record):
    pass


class _BytesStorage(_Record):
    pass


class _ChunkStorage(_Record):
    pass


class _TensorProperties(_Record):
    pass


class _MetadataIndex(_Record):
    pass


class _StorageMeta(_Record):
    pass


class _StorageInfo(_Record):
    pass


_RECORDS: dict[tuple[str, str], type[_Record]] = {
    (f"{_DCP}.metadata", "Metadata"): _Metadata,
    (f"{_DCP}.metadata", "TensorStorageMetadata"): _TensorStorage,
    (f"{_DCP}.metadata", "BytesStorageMetadata"): _BytesStorage,
    (f"{_DCP}.metadata", "ChunkStorageMetadata"): _ChunkStorage,
    (f"{_DCP}.metadata", "TensorProperties"): _TensorProperties,
    (f"{_DCP}.metadata", "MetadataIndex"): _MetadataIndex,
    (f"{_DCP}.metadata", "StorageMeta"): _StorageMeta,
    (f"{_DCP}.filesystem", "_StorageInfo"): _StorageInfo,
}

# Every dtype torch has, by the name its pickle uses (``torch.float32`` -> "float32");
# vars(), not getattr(): looking a name up must not import torch's lazy submodules.
_DTYPES = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}


def _fail(what: str) -> MetadataError:
    return MetadataError(f"invalid DCP .metadata: {what}")


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if type(value) is not int or not minimum <= value <= _MAX_INT:
        raise _fail(f"{where} must be an integer in [{minimum}, 2**62], got {value!r}"[:300])
    return value


def _ints(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > _MAX_DIMS:
        raise _fail(f"{where} must be a sequence of at most {_MAX_DIMS} integers")
    return tuple(_int(v, f"{where}[{i}]") for i, v in enumerate(value))


def _size(*args: Any) -> tuple[int, ...]:
    """``torch.Size(dims)`` as a plain tuple of bounded integers."""
    if len(args) > 1:
        raise _fail("torch.Size takes one argument")
    return _ints(args[0] if args else (), "torch.Size")


def _layout(name: Any) -> str:
    """``torch.serialization._get_layout(name)``: the layout's name, kept as a string."""
    if not isinstance(name, str) or not re.fullmatch(r"torch\.[a-z_]{1,40}", name):
        raise _fail(f"layout {name!r:.80} is not a torch layout name")
    return name


def _memory_format(value: Any) -> int:
    """DCP's ``_MEM_FORMAT_ENCODING(n)``; the memory format does not change stored bytes."""
    if type(value) is not int or not 0 <= value <= 2:
        raise _fail(f"memory format encoding {value!r:.80} is not 0, 1 or 2")
    return value


def _path(*parts: Any) -> str:
    """A pickled ``pathlib`` path (``StorageMeta.checkpoint_id``), kept as text only."""
    if len(parts) > _MAX_PATH or not all(isinstance(p, str) for p in parts):
        raise _fail("a pickled path must be made of strings")
    return "/".join(parts)


def _reconstructor(cls: Any, base: Any, state: Any) -> _Record:
    """``copyreg._reconstructor`` (protocol 0 and 1 pickles), for the stand-ins only."""
    if not (isinstance(cls, type) and issubclass(cls, _Record)) or base is not object or state:
        raise _fail("copyreg._reconstructor may only build DCP metadata records")
    return cls.__new__(cls)


_GUARDED: dict[tuple[str, str], Any] = {
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _layout,
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"): _memory_format,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,
}
# Python 3.13 pickles paths from pathlib._local; earlier versions from pathlib.
_PATH_CLASSES = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
_GUARDED.update({(m, n): _path for m in ("pathlib", "pathlib._local") for n in _PATH_CLASSES})


class _DcpUnpickler(pickle.Unpickler):
    """Resolves only what DCP metadata is made of; everything else is refused unrun."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _RECORDS:
            return _RECORDS[(module, name)]
        if (module, name) in _GUARDED:
            return _GUARDED[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        raise UnsafeObjectError(
            f"refusing global {module}.{name} in a torch.distributed.checkpoint .metadata "
            "file: DCP metadata is made of DCP's dataclasses, torch.Size and dtypes only, and "
            "unpickling anything else could run code. The file is damaged, hostile, or was "
            "written by a custom DCP planner or storage writer this reader does not know."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeObjectError("a DCP .metadata file must not contain persistent ids")


# ------------------------------------------------------------------ the decoded DCP metadata


@dataclass(frozen=True)
class DcpStorage:
    """Where one DCP item's bytes lie: ``length`` bytes at ``offset`` of data file ``file``."""

    file: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class DcpTensor:
    """A tensor of the DCP checkpoint: dtype name, whole shape, stored (offsets, sizes) boxes."""

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


@dataclass(frozen=True)
class DcpMetadata:
    """A DCP ``.metadata`` as plain validated data.

    ``storage`` is keyed by (fqn, chunk offsets) for tensor chunks and by
    (fqn, None) for byte entries; ``paths`` is ``planner_data`` (fqn -> the
    key path in the nested state that was saved), where DCP recorded it.
    """

    tensors: dict[str, DcpTensor]
    byte_keys: tuple[str, ...]
    storage: dict[tuple[str, tuple[int, ...] | None], DcpStorage]
    paths: dict[str, KeyPath]
    version: str | None = None
    save_id: str | None = None


def _fields(record: Any, cls: type[_Record], what: str) -> dict[str, Any]:
    """The dataclass fields a record's pickle gave it (a dict, or (dict, slots) for slots)."""
    if type(record) is not cls:
        raise _fail(f"{what} is {type(record).__name__.lstrip('_')}, not a DCP {what}")
    state = record.state
    if state is None:
        return {}
    if isinstance(state, tuple) and len(state) == 2:  # a dataclass with __slots__
        merged: dict[str, Any] = {}
        for part in state:
            if part is not None and not isinstance(part, dict):
                raise _fail(f"{what} has malformed state")
            merged.update(part or {})
        state = merged
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise _fail(f"{what} has malformed state")
    return state


def _dtype_of(properties: Any, fqn: str) -> str:
    if type(properties) is not _TensorProperties:
        raise _fail(f"tensor {fqn!r} has no TensorProperties")
    state = properties.state
    if isinstance(state, tuple) and len(state) == 5:  # TensorProperties.__getstate__
        dtype, layout = state[0], state[1]
    else:
        fields = _fields(properties, _TensorProperties, "TensorProperties")
        dtype, layout = fields.get("dtype"), fields.get("layout", "torch.strided")
    if not isinstance(dtype, torch.dtype):
        raise _fail(f"tensor {fqn!r} has dtype {dtype!r:.80}, not a torch dtype")
    if layout != "torch.strided":
        raise MetadataError(
            f"DCP tensor {fqn!r} has layout {layout}; only strided (dense) tensors are read"
        )
    name = str(dtype).removeprefix("torch.")
    dtype_from_name(name)  # quantized dtypes and ones this torch lacks are refused here
    return name


def _decode_tensor(record: Any, fqn: str) -> DcpTensor:
    fields = _fields(record, _TensorStorage, f"entry {fqn!r}")
    shape = _ints(fields.get("size"), f"{fqn}.size")
    chunks = fields.get("chunks")
    if not isinstance(chunks, list) or len(chunks) > 1_000_000:
        raise _fail(f"tensor {fqn!r} has no chunk list")
    boxes = []
    for n, chunk in enumerate(chunks):
        where = f"{fqn}.chunks[{n}]"
        cf = _fields(chunk, _ChunkStorage, where)
        offsets = _ints(cf.get("offsets"), f"{where}.offsets")
        sizes = _ints(cf.get("sizes"), f"{where}.sizes")
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise _fail(f"{where} has {len(offsets)}-d offsets for a {len(shape)}-d tensor")
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            raise _fail(f"{where} lies outside the tensor's shape {list(shape)}")
        boxes.append((offsets, sizes))
    return DcpTensor(_dtype_of(fields.get("properties"), fqn), shape, tuple(boxes))


def _decode_storage(storage_data: Any) -> dict[tuple[str, tuple[int, ...] | None], DcpStorage]:
    if not isinstance(storage_data, dict):
        raise _fail(
            "storage_data is not a dict (written by a storage writer other than DCP's "
            "FileSystemWriter / FsspecWriter?)"
        )
    out: dict[tuple[str, tuple[int, ...] | None], DcpStorage] = {}
    for index, info in storage_data.items():
        key_fields = _fields(index, _MetadataIndex, "storage_data key")
        fqn = key_fields.get("fqn")
        if not isinstance(fqn, str):
            raise _fail("a storage_data key has no fqn")
        offset = key_fields.get("offset")
        at = None if offset is None else _ints(offset, f"storage_data[{fqn!r}].offset")
        f = _fields(info, _StorageInfo, f"storage_data[{fqn!r}]")
        name = f.get("relative_path")
        if not is_safe_file_name(name):
            raise _fail(f"entry {fqn!r} names data file {name!r:.80}, not a plain file name")
        transforms = f.get("transform_descriptors") or ()
        if not isinstance(transforms, (list, tuple)) or not all(
            isinstance(t, str) for t in transforms
        ):
            raise _fail(f"entry {fqn!r} has malformed transform descriptors")
        out[(fqn, at)] = DcpStorage(
            name,
            _int(f.get("offset"), f"storage_data[{fqn!r}].offset"),
            _int(f.get("length"), f"storage_data[{fqn!r}].length"),
            tuple(transforms),
        )
    return out


def _decode_paths(planner_data: Any) -> dict[str, KeyPath]:
    """planner_data's fqn -> key path; ones that do not spell their fqn are left out."""
    if not isinstance(planner_data, dict):
        return {}  # saved without flattening (or by a custom planner): keys stay flat
    paths: dict[str, KeyPath] = {}
    for fqn, path in planner_data.items():
        if (
            isinstance(fqn, str)
            and isinstance(path, tuple)
            and 0 < len(path) <= _MAX_PATH
            and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path)
            and ".".join(str(p) for p in path) == fqn
        ):
            paths[fqn] = path
    return paths


def decode_dcp_metadata(data: bytes) -> DcpMetadata:
    """Decode a DCP ``.metadata`` file without running code from it.

    Raises :class:`UnsafeObjectError` naming the first global that DCP metadata
    has no use for, and :class:`MetadataError` for anything malformed.
    """
    if len(data) > MAX_DCP_METADATA_BYTES:
        raise _fail(f"{len(data)} bytes, above the {MAX_DCP_METADATA_BYTES} limit")
    try:
        root = _DcpUnpickler(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated, not a pickle, or a record called with arguments
        raise _fail(f"not a readable pickle ({type(exc).__name__}: {exc})"[:500]) from exc
    fields = _fields(root, _Metadata, "Metadata")
    sdm = fields.get("state_dict_metadata")
    if not isinstance(sdm, dict) or not all(isinstance(k, str) for k in sdm):
        raise _fail("state_dict_metadata is not a dict keyed by name")
    tensors: dict[str, DcpTensor] = {}
    byte_keys = []
    for fqn, item in sdm.items():
        if type(item) is _BytesStorage:
            byte_keys.append(fqn)
        else:
            tensors[fqn] = _decode_tensor(item, fqn)
    storage_meta = fields.get("storage_meta")
    save_id = None
    if type(storage_meta) is _StorageMeta:
        save_id = _fields(storage_meta, _StorageMeta, "StorageMeta").get("save_id")
    version = fields.get("version")
    return DcpMetadata(
        tensors=tensors,
        byte_keys=tuple(byte_keys),
        storage=_decode_storage(fields.get("storage_data")),
        paths=_decode_paths(fields.get("planner_data")),
        version=version if isinstance(version, str) else None,
        save_id=save_id if isinstance(save_id, str) else None,
    )


__all__ = [
    "DCP_METADATA_FILE",
    "MAX_DCP_METADATA_BYTES",
    "DcpMetadata",
    "DcpStorage",
    "DcpTensor",
    "decode_dcp_metadata",
]
