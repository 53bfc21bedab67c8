"""The allow-list: which globals an object entry may reference when it is unpickled.

The restricted unpickler in :mod:`.objects` resolves only what is allowed here:
built-in data containers, the classes users add with :func:`allow_class` (also a
class decorator), :func:`allow_module` (every class defined under a package
prefix of their own) and :func:`allow_global`, and a few constructors whose
arguments are bounded before they run. It is kept apart from the codec so that
what loading trusts is defined, and reviewed, in one place.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Mapping
from typing import Any, TypeVar

from ..errors import UnsafeObjectError

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
