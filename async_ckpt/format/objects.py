"""Encoding of non-tensor leaves: plain JSON values, bytes, and allow-listed objects.

Plain values (None, bool, int, float, str, bytes) live in the metadata as JSON.
Any other picklable object is pickled into a data file and decoded with a
restricted unpickler that resolves only allow-listed globals, so loading a
checkpoint never runs code that the checkpoint chose.
"""

from __future__ import annotations

import base64
import io
import math
import pickle
from typing import Any

from ..errors import MetadataError, UnsafeObjectError

PLAIN_TYPES = (type(None), bool, int, float, str, bytes)

# Globals an object entry may reference. Classes here are data containers whose
# reconstruction runs no user code.
_SAFE_GLOBALS: set[tuple[str, str]] = {
    ("builtins", name)
    for name in (
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "bytearray",
        "complex",
        "slice",
        "range",
        "object",
    )
} | {
    ("collections", "OrderedDict"),
    ("collections", "deque"),
    ("datetime", "datetime"),
    ("datetime", "date"),
    ("datetime", "time"),
    ("datetime", "timedelta"),
    ("datetime", "timezone"),
    ("decimal", "Decimal"),
    ("fractions", "Fraction"),
    ("argparse", "Namespace"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("copyreg", "_reconstructor"),
    ("torch", "Size"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.random._pickle", "__randomstate_ctor"),
    ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__generator_ctor"),
    ("numpy.random.mtrand", "RandomState"),
    ("numpy.random._mt19937", "MT19937"),
    ("numpy.random._pcg64", "PCG64"),
    ("numpy.random._pcg64", "PCG64DXSM"),
    ("numpy.random._philox", "Philox"),
    ("numpy.random._sfc64", "SFC64"),
    # A Generator's bit generator pickles its SeedSequence through Cython's helper,
    # which only builds a SeedSequence (subclass) and sets its fields.
    ("numpy.random.bit_generator", "SeedSequence"),
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
    ("numpy.random._generator", "Generator"),
}
_SAFE_NUMPY_DTYPE_MODULE = "numpy.dtypes"


def allow_global(module: str, name: str) -> None:
    """Allow object entries to reference ``module.name`` (for your own data classes).

    Only allow classes whose unpickling runs no code you do not trust: plain
    data holders, never callables such as ``os.system`` or ``eval``.
    """
    _SAFE_GLOBALS.add((module, name))


def allow_class(cls: type) -> None:
    """Allow object entries to hold instances of ``cls`` (see :func:`allow_global`)."""
    allow_global(cls.__module__, cls.__qualname__)


def is_allowed(module: str, name: str) -> bool:
    """Whether the restricted unpickler resolves ``module.name``."""
    return (module, name) in _SAFE_GLOBALS or module == _SAFE_NUMPY_DTYPE_MODULE


_MAX_FRACTION_TEXT = 1000


def _bytearray_from_bytes(*args: Any) -> bytearray:
    # Pickling a bytearray yields bytearray(<bytes>); bytearray(<int>) would let a
    # 50-byte entry allocate any amount of memory.
    if len(args) > 2 or (args and not isinstance(args[0], (bytes, bytearray, str))):
        raise UnsafeObjectError("object entry builds a bytearray from something other than bytes")
    return bytearray(*args)


def _bounded_fraction(*args: Any) -> Any:
    import fractions
    import re

    if all(isinstance(a, int) and not isinstance(a, bool) for a in args) and len(args) <= 2:
        return fractions.Fraction(*args)
    if (
        len(args) == 1
        and isinstance(args[0], str)
        and len(args[0]) <= _MAX_FRACTION_TEXT
        and re.fullmatch(r"\s*[-+]?\d+(/\d+)?\s*", args[0])
    ):
        return fractions.Fraction(args[0])
    raise UnsafeObjectError("object entry builds a Fraction from an unbounded or odd argument")


# Allow-listed callables whose arguments must be bounded before they run.
_GUARDED: dict[tuple[str, str], Any] = {
    ("builtins", "bytearray"): _bytearray_from_bytes,
    ("fractions", "Fraction"): _bounded_fraction,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GUARDED:
            return _GUARDED[(module, name)]
        if not is_allowed(module, name):
            raise UnsafeObjectError(
                f"refusing to load {module}.{name} from a checkpoint object entry: it is not "
                "allow-listed, and unpickling it could run code. If you trust this checkpoint "
                f"and the class is plain data, call async_ckpt.allow_global({module!r}, {name!r}) "
                "before loading."
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeObjectError("object entries must not contain persistent ids")


def dumps_object(obj: Any) -> bytes:
    """Pickle ``obj`` and check now that it will load back under the allow-list."""
    try:
        payload = pickle.dumps(obj, protocol=4)
    except Exception as exc:
        raise UnsafeObjectError(
            f"cannot save a leaf of type {type(obj).__qualname__}: it is not picklable ({exc})"
        ) from exc
    loads_object(payload)  # fail at save time, not at the restore after a crash
    return payload


def loads_object(payload: bytes | memoryview) -> Any:
    """Decode an object entry with the restricted unpickler."""
    try:
        return _RestrictedUnpickler(io.BytesIO(payload)).load()
    except UnsafeObjectError:
        raise
    except Exception as exc:
        raise UnsafeObjectError(
            f"object entry cannot be decoded: {type(exc).__name__}: {exc}"[:500]
        ) from exc


# Plain values above these sizes are stored as object entries (pickled into a data
# file, block-checksummed) instead of inside the metadata: a 500 MiB string would
# push the metadata past the reader's limit, and an int of 5000 digits past JSON's.
MAX_INLINE_BYTES = 64 * 1024
MAX_INLINE_INT_BITS = 1024


def fits_inline(value: Any) -> bool:
    """Whether the plain value ``value`` is kept in the metadata (else as an object entry)."""
    if isinstance(value, (str, bytes)):
        return len(value) <= MAX_INLINE_BYTES
    if isinstance(value, int):
        return value.bit_length() <= MAX_INLINE_INT_BITS
    return True


def encode_plain(value: Any) -> dict[str, Any]:
    """JSON form of a plain value (None, bool, int, float, str, bytes)."""
    if value is None:
        return {"type": "none"}
    if isinstance(value, bool):
        return {"type": "bool", "value": value}
    if isinstance(value, int):
        return {"type": "int", "value": value}
    if isinstance(value, float):
        return {"type": "float", "value": value if math.isfinite(value) else repr(value)}
    if isinstance(value, str):
        return {"type": "str", "value": value}
    if isinstance(value, bytes):
        return {"type": "bytes", "value": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"not a plain value: {type(value)!r}")


def decode_plain(entry: dict[str, Any]) -> Any:
    """Inverse of :func:`encode_plain`; malformed entries are metadata errors."""
    if not isinstance(entry, dict) or set(entry) - {"type", "value"}:
        raise MetadataError(f"malformed value entry {entry!r}: expected {{'type', 'value'}}")
    kind = entry.get("type")
    value = entry.get("value")
    expected = {"bool": bool, "int": int, "str": str}
    if kind == "none":
        return None
    if kind in expected and isinstance(value, expected[kind]):
        if kind == "int" and isinstance(value, bool):
            raise MetadataError(f"malformed int value entry {entry!r}")
        return value
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if value in ("nan", "inf", "-inf"):
            return float(value)
    if kind == "bytes" and isinstance(value, str):
        try:
            return base64.b64decode(value.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError) as exc:
            raise MetadataError(f"malformed bytes value entry: {exc}") from exc
    raise MetadataError(f"malformed value entry {entry!r}")
