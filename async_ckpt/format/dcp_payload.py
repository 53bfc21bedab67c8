"""The payloads inside DCP data files: ``torch.save`` blobs and safetensors headers.

DCP's default writer stores each tensor chunk and each non-tensor value with
``torch.save``. They are decoded here with ``torch.load(weights_only=True)``,
torch's own restricted unpickler; a value whose class torch does not allow
loads only if the user allow-listed it (``async_ckpt.allow_class``), and is
otherwise a :class:`~.dcp.Refused` naming it. DCP's safetensors serialization
stores raw bytes after a JSON header instead, parsed here. Pure data, no I/O.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import pickle
import struct
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import CorruptCheckpointError, MetadataError, UnsafeObjectError
from .allow_list import is_allowed
from .dcp_translate import RawTensor, Refused
from .dtypes import dtype_from_name, itemsize

SAFETENSORS_PREFIX = 8
"""Bytes before a safetensors header: its length, a little-endian u64."""

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # as the safetensors library bounds it

_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64",
}


def _reason(exc: BaseException) -> str:
    """The line of torch's error that says what failed, without its advice boilerplate."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _load(blob: bytes | memoryview, what: str, allowed: list[Any]) -> Any:
    try:
        with _safe_globals(allowed):
            return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):  # torch's restricted unpickler refused a global
            raise UnsafeObjectError(
                f"refusing {what} of the DCP checkpoint: {_reason(exc)}; call "
                "async_ckpt.allow_class(cls) first if you trust that class"
            ) from exc
        raise CorruptCheckpointError(
            f"{what} of the DCP checkpoint cannot be decoded ({_reason(exc)}); the data file "
            "is damaged"
        ) from exc
    except Exception as exc:  # a damaged or truncated blob
        raise CorruptCheckpointError(
            f"{what} of the DCP checkpoint cannot be decoded ({type(exc).__name__}: "
            f"{_reason(exc)}); the data file is damaged or truncated"
        ) from exc


@contextlib.contextmanager
def _safe_globals(allowed: list[Any]) -> Iterator[None]:
    if not allowed:
        yield
        return
    with torch.serialization.safe_globals(allowed):
        yield


def decode_tensor_blob(
    blob: bytes | memoryview, dtype: str, sizes: tuple[int, ...], what: str
) -> torch.Tensor:
    """The raw bytes (a flat uint8 tensor) of a ``torch.save``'d tensor chunk.

    Refuses a blob that holds anything but a tensor of ``dtype`` and ``sizes``.
    """
    tensor = _load(blob, what, [])
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        raise CorruptCheckpointError(
            f"{what} of the DCP checkpoint holds {type(tensor).__name__}, not a dense tensor"
        )
    if str(tensor.dtype).removeprefix("torch.") != dtype or tuple(tensor.shape) != sizes:
        raise CorruptCheckpointError(
            f"{what} of the DCP checkpoint holds a {tensor.dtype} tensor of shape "
            f"{list(tensor.shape)}, but its metadata says {dtype} {list(sizes)}"
        )
    flat = tensor.detach().contiguous().reshape(-1)  # channels-last and views: row-major
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def _allowed_global(full: str) -> Any | None:
    """The object ``full`` (``module.qualname``) names, if the user allow-listed it."""
    parts = full.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module, qualname = ".".join(parts[:cut]), ".".join(parts[cut:])
        if is_allowed(module, qualname):
            # Importing is safe here: the user allow-listed this module's class.
            obj: Any = importlib.import_module(module)
            for attr in qualname.split("."):
                obj = getattr(obj, attr)
            return obj
    return None


def decode_object_blob(blob: bytes | memoryview, what: str) -> Any:
    """The value of a DCP byte entry, or :class:`Refused` naming a class not allow-listed.

    torch's restricted unpickler decodes it; classes beyond the ones torch
    allows are resolved only if ``async_ckpt.allow_class`` / ``allow_global``
    listed them. A refusal is returned, not raised, so that only a load that
    asks for this entry fails.
    """
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    allowed = []
    if finder is not None:  # torch >= 2.5: resolve the user's allow-listed classes
        try:
            unsafe = finder(io.BytesIO(blob))
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{what} of the DCP checkpoint cannot be decoded ({type(exc).__name__}); "
                "the data file is damaged"
            ) from exc
        for full in unsafe:
            obj = _allowed_global(full)
            if obj is None:
                return Refused(full)
            allowed.append(obj)
    return _load(blob, what, allowed)


def safetensors_header_length(prefix: bytes | memoryview, what: str) -> int:
    """The header length a safetensors document starts with (its first 8 bytes)."""
    (length,) = struct.unpack("<Q", bytes(prefix[:SAFETENSORS_PREFIX]))
    if not 2 <= length <= MAX_SAFETENSORS_HEADER:
        raise MetadataError(f"{what}: safetensors header of {length} bytes is not plausible")
    return length


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys")
    return out


def _ints(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, list) and all(type(v) is int and 0 <= v <= 2**62 for v in value):
        return tuple(value)
    return None


def parse_safetensors_header(
    header: bytes | memoryview, data_start: int, what: str
) -> dict[str, RawTensor]:
    """The tensors a safetensors header describes; ``data_start``: where its data begins
    in the data file. DCP notes each tensor's place in the whole tensor in the header's
    ``__metadata__`` (``DCP_SHARDING_INFO``)."""
    try:
        doc = json.loads(bytes(header).decode("utf-8"), object_pairs_hook=_unique)
        info = doc.pop("__metadata__", None) or {}
        sharding = json.loads(info.get("DCP_SHARDING_INFO", "{}"), object_pairs_hook=_unique)
    except (ValueError, AttributeError, TypeError, RecursionError) as exc:
        raise MetadataError(f"{what}: malformed safetensors header ({exc})"[:300]) from exc
    if not isinstance(doc, dict) or not isinstance(sharding, dict):
        raise MetadataError(f"{what}: malformed safetensors header")
    found = {}
    for key, item in doc.items():
        dtype = _SAFETENSORS_DTYPES.get(item.get("dtype")) if isinstance(item, dict) else None
        shape = _ints(item.get("shape")) if dtype else None
        span = _ints(item.get("data_offsets")) if dtype else None
        if dtype is None or shape is None or span is None or len(span) != 2:
            raise MetadataError(f"{what}: malformed safetensors entry {key!r}")
        nbytes = math.prod(shape) * itemsize(dtype_from_name(dtype))
        if span[1] - span[0] != nbytes:
            raise MetadataError(f"{what}: safetensors entry {key!r} has the wrong byte length")
        place = sharding.get(key)
        saved = _ints(place.get("saved_offsets")) if isinstance(place, dict) else None
        found[key] = RawTensor(dtype, shape, data_start + span[0], nbytes, saved)
    return found


__all__ = [
    "SAFETENSORS_PREFIX",
    "decode_object_blob",
    "decode_tensor_blob",
    "parse_safetensors_header",
    "safetensors_header_length",
]
