"""Encoding of non-tensor leaves: plain JSON values, bytes, and allow-listed objects.

Plain values (None, bool, int, float, str, bytes) live in the metadata as JSON.
Any other picklable object is pickled into a data file and decoded with a
restricted unpickler that resolves only the globals :mod:`.allow_list` allows,
so loading a checkpoint never runs code that the checkpoint chose. A save
checks that its objects load back (:func:`dumps_object`) and says so in
save-time terms when they would not.
"""

from __future__ import annotations

import base64
import io
import math
import pickle
import sys
from typing import Any

from ..errors import MetadataError, UnsafeObjectError
from .allow_list import (
    _GUARDED,
    _REFUSED_PACKAGES,
    _module_class,
    _under_allowed_module,
    is_allowed,
)

# Defined in .allow_list; still importable from here.
from .allow_list import allow_class as allow_class
from .allow_list import allow_global as allow_global
from .allow_list import allow_module as allow_module

PLAIN_TYPES = (type(None), bool, int, float, str, bytes)


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
