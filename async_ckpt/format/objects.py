"""Encoding of non-tensor leaves: plain JSON values, bytes, and allow-listed objects.

Plain values (None, bool, int, float, str, bytes) live in the metadata as JSON.
Any other picklable object is pickled into a data file and decoded with a
restricted unpickler that resolves only allow-listed globals, so loading a
checkpoint never runs code that the checkpoint chose. Users extend the list
with :func:`allow_class` (also a class decorator), :func:`allow_module` (every
class defined under a package prefix of their own) and :func:`allow_global`.
A save checks that its objects load back (:func:`dumps_object`) and says so
in save-time terms when they would not.
"""

from __future__ import annotations

import base64
import io
import math
import pickle
import re
import sys
import types
from collections.abc import Mapping
from typing import Any, TypeVar

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


_C = TypeVar("_C", bound=type)


def allow_class(cls: _C) -> _C:
    """Allow object entries to hold instances of ``cls``; returns ``cls``.

    Call it once before saving and before loading (``async_ckpt.allow_class(MyConfig)``),
    or use it as a class decorator::

        @async_ckpt.allow_class
        @dataclasses.dataclass
        class MyConfig:
            lr: float = 1e-3

    A checkpoint may then construct ``cls`` with arguments of its choosing (as
    unpickling does), so allow only plain data classes (see :func:`allow_global`).
    """
    if not isinstance(cls, type):
        raise UnsafeObjectError(
            f"allow_class takes a class, not {type(cls).__name__} ({cls!r}): the allow-list "
            "holds classes only. For a function, store its result instead."
        )
    allow_global(cls.__module__, cls.__qualname__)
    return cls


# Module prefixes allow_module refuses: the standard library and packages whose classes
# run code when constructed (processes, files, imports, pickles, compiled code).
_REFUSED_PACKAGES = frozenset(sys.stdlib_module_names) | {
    "__main__",
    "async_ckpt",
    "torch",
    "torchvision",
    "torchaudio",
    "numpy",
    "scipy",
    "pandas",
    "pip",
    "setuptools",
    "pkg_resources",
    "_distutils_hack",
    "importlib_metadata",
    "importlib_resources",
    "typing_extensions",
    "IPython",
    "ipykernel",
    "jupyter_client",
    "_pytest",
    "pytest",
    "dill",
    "cloudpickle",
    "joblib",
    "yaml",
    "jinja2",
    "fsspec",
    "s3fs",
    "gcsfs",
    "botocore",
    "boto3",
    "requests",
    "urllib3",
    "psutil",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "accelerate",
    "transformers",
    "huggingface_hub",
    "safetensors",
    "triton",
}
_ALLOWED_MODULES: set[str] = set()
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def allow_module(module: str | types.ModuleType) -> None:
    """Allow object entries to hold instances of every class defined under ``module``.

    ``async_ckpt.allow_module("mypkg")`` allows ``mypkg.Config``,
    ``mypkg.models.Spec`` and every other class whose ``__module__`` is
    ``mypkg`` or starts with ``mypkg.``: your own package's data classes,
    allowed once. What it does not open:

    * only classes, defined in that module (``cls.__module__``): never a
      function, a method or any other attribute, and never a class the module
      merely imports (``from subprocess import Popen`` in ``mypkg.util`` does not
      make ``mypkg.util.Popen`` loadable);
    * only modules already imported: a checkpoint never makes async_ckpt import
      a module (import the one defining your classes before loading);
    * the standard library, ``__main__`` and common third-party packages
      (``torch``, ``numpy``, ``pandas``, ``dill``, ...) are refused as prefixes:
      use :func:`allow_class` for a class of theirs.

    A checkpoint may construct any of those classes with arguments of its
    choosing, as unpickling does, so allow only packages you own whose classes'
    constructors do no more than store their arguments; a class that starts
    processes, opens files or loads plugins when constructed does not belong
    under an allowed prefix.
    """
    name = module.__name__ if isinstance(module, types.ModuleType) else module
    if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
        raise UnsafeObjectError(
            f"allow_module takes a module or a dotted module name like 'mypkg', not {module!r}"
        )
    top = name.partition(".")[0]
    if top == "__main__":
        raise UnsafeObjectError(
            "allow_module('__main__') is refused: __main__ is whichever script runs, so a "
            "checkpoint loaded by another program would be allowed that program's classes. "
            "Allow your script's plain data classes one by one with @async_ckpt.allow_class, "
            "or move them into a module of your own."
        )
    if top in _REFUSED_PACKAGES or top in sys.builtin_module_names:
        raise UnsafeObjectError(
            f"allow_module({name!r}) is refused: {top!r} is not a package of your own, and "
            "allowing all of its classes could let a checkpoint run code. Allow the plain "
            "data classes you need one by one with async_ckpt.allow_class(cls)."
        )
    _ALLOWED_MODULES.add(name)


def _under_allowed_module(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in _ALLOWED_MODULES)


def _module_class(module: str, name: str) -> type | None:
    """The class ``module.name`` if an allowed module prefix covers it, else None.

    Looks only into modules already imported and only through ``__dict__``
    (no import, no module ``__getattr__``, no descriptors), and only returns a
    class that was defined there under that name.
    """
    if not _ALLOWED_MODULES or not _under_allowed_module(module):
        return None
    obj: Any = sys.modules.get(module)
    if obj is None:
        return None
    for part in name.split("."):
        namespace = getattr(obj, "__dict__", None)
        if not isinstance(namespace, Mapping):
            return None
        obj = namespace.get(part)
        if not isinstance(obj, type):
            return None
    if obj.__module__ != module or obj.__qualname__ != name:
        return None  # imported from elsewhere, or an alias
    return obj


def is_allowed(module: str, name: str) -> bool:
    """Whether the restricted unpickler resolves ``module.name``."""
    return (
        (module, name) in _SAFE_GLOBALS
        or module == _SAFE_NUMPY_DTYPE_MODULE
        or _module_class(module, name) is not None
    )


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


class _RefusedGlobal(UnsafeObjectError):
    """The restricted unpickler met ``module.name``, which is not allow-listed."""

    def __init__(self, message: str, module: str, name: str) -> None:
        super().__init__(message)
        self.module = module
        self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GUARDED:
            return _GUARDED[(module, name)]
        cls = _module_class(module, name)
        if cls is not None:  # allowed by allow_module: resolved without importing anything
            return cls
        if not is_allowed(module, name):
            hint = ""
            if _under_allowed_module(module):
                hint = (
                    f" ({module} is under a prefix allowed with async_ckpt.allow_module, which "
                    "covers only classes defined in modules already imported: import "
                    f"{module} first if {name} is such a class)"
                )
            raise _RefusedGlobal(
                f"refusing to load {module}.{name} from a checkpoint object entry: it is not "
                "allow-listed, and unpickling it could run code. If you trust this checkpoint "
                f"and the class is plain data, call async_ckpt.allow_global({module!r}, {name!r}) "
                f"before loading.{hint}",
                module,
                name,
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeObjectError("object entries must not contain persistent ids")


def _lookup(module: str, name: str) -> Any:
    """What ``module.name`` is in this process, without importing anything (None if unknown)."""
    obj: Any = sys.modules.get(module)
    for part in name.split("."):
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj


def _save_refusal(obj: Any, refused: _RefusedGlobal) -> UnsafeObjectError:
    """Why ``obj`` cannot be saved, said at save time, with the one line that fixes it."""
    kind = type(obj)
    leaf = f"{kind.__module__}.{kind.__qualname__}"
    full = f"{refused.module}.{refused.name}"
    subject = f"this {leaf} holds a {full}, which" if full != leaf else full
    target = _lookup(refused.module, refused.name)
    if not isinstance(target, type):
        what = type(target).__name__ if target is not None else "global"
        return UnsafeObjectError(
            f"{leaf} pickles as a call to {full} (a {what}, not a class), and loading never "
            "calls a function a checkpoint names, so a checkpoint holding it could not be "
            "loaded back: the save is refused before writing anything. Save the object's data "
            "instead (plain values, tensors, or a dataclass of them), or give the class a plain "
            "pickle (no __reduce__ naming a function)."
        )
    short = refused.name
    also = [
        "decorate the class with @async_ckpt.allow_class",
        f"async_ckpt.allow_global({refused.module!r}, {refused.name!r})",
    ]
    top = refused.module.partition(".")[0]
    if top not in _REFUSED_PACKAGES and top not in sys.builtin_module_names:
        also.append(f"async_ckpt.allow_module({top!r}) for every class of your package")
    return UnsafeObjectError(
        f"{subject} is not on the allow-list that loading uses, so a checkpoint holding it "
        "could not be loaded back: the save is refused before writing anything. Fix: "
        f"async_ckpt.allow_class({short}), once, before saving and before loading, if {short} "
        f"is plain data you trust (or: {'; '.join(also)})."
    )


def dumps_object(obj: Any) -> bytes:
    """Pickle ``obj`` and check now that it will load back under the allow-list."""
    try:
        payload = pickle.dumps(obj, protocol=4)
    except Exception as exc:
        raise UnsafeObjectError(
            f"{type(obj).__qualname__} is not picklable ({exc}): save its data as plain values "
            "or tensors instead"
        ) from exc
    try:
        loads_object(payload)  # fail at save time, not at the restore after a crash
    except _RefusedGlobal as exc:
        raise _save_refusal(obj, exc) from exc
    except UnsafeObjectError as exc:
        raise UnsafeObjectError(
            f"{type(obj).__module__}.{type(obj).__qualname__} was pickled but would not load "
            f"back: {exc}"
        ) from exc
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
