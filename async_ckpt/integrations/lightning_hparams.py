"""Which hyper-parameter classes the Lightning plugin may allow-list on its own.

async_ckpt pickles non-tensor leaves and reads them back through an
allow-list (``async_ckpt.allow_class``), so loading a checkpoint never runs
code the checkpoint chose. Lightning stores a module's ``__init__`` arguments
under ``"hyper_parameters"``, and those are often dataclasses and enums of the
user's own. :func:`plain_data_class` decides which classes are safe to allow
without asking: classes whose unpickling builds an instance and sets its
fields, and nothing else. The plugin allows those it finds in the
hyper-parameters at save time and records their names in the checkpoint;
:func:`allow_recorded` allows them again in the loading process, but only
classes of modules that process has imported already (a name in a checkpoint
never makes us import anything) that pass the same test.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from ..format.allow_list import allow_class, is_allowed

# Lightning's keys for the module's and the datamodule's hyper-parameters.
HPARAMS_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")


def class_name(cls: type) -> str:
    """``"module:qualname"``, the form recorded in a checkpoint."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _from_module(func: Any, module: str) -> bool:
    return getattr(getattr(func, "__func__", func), "__module__", None) == module


def _plain_dataclass(cls: Any) -> bool:
    # Unpickling an instance (protocol 2+) calls cls.__new__(cls), then sets its state
    # through __setstate__ if the class has one, else straight into __dict__ (or through
    # setattr for slots). Anything that could run the class's own code is refused.
    if cls.__new__ is not object.__new__:
        return False
    if cls.__reduce_ex__ is not object.__reduce_ex__ or cls.__reduce__ is not object.__reduce__:
        return False
    if hasattr(cls, "__getnewargs__") or hasattr(cls, "__getnewargs_ex__"):
        return False
    # pickle looks __setstate__ up on the instance: a __getattr__ would run on that miss
    if hasattr(cls, "__getattr__") or cls.__getattribute__ is not object.__getattribute__:
        return False
    setstate = getattr(cls, "__setstate__", None)
    if setstate is not None and not (
        _from_module(setstate, "dataclasses") and setstate.__name__ == "_dataclass_setstate"
    ):
        return False
    # Slots are set with setattr: a frozen dataclass's __setattr__ is generated (a user
    # cannot define one), any other class must keep object's.
    params = getattr(cls, "__dataclass_params__", None)
    frozen = bool(getattr(params, "frozen", False))
    return frozen or cls.__setattr__ is object.__setattr__


def _plain_enum(cls: Any) -> bool:
    # A member unpickles as cls(value): a lookup, unless the class customised the lookup.
    if type(cls) is not enum.EnumMeta:
        return False
    reduce_ex, missing = getattr(cls, "__reduce_ex__", None), getattr(cls, "_missing_", None)
    if not _from_module(reduce_ex, "enum") or not _from_module(missing, "enum"):
        return False
    return getattr(cls, "__new__", None) is enum.Enum.__new__


def plain_data_class(cls: Any) -> bool:
    """Whether unpickling an instance of ``cls`` runs no code of the class itself.

    True for dataclasses that keep object's construction and state protocol
    (no custom ``__new__``, ``__reduce__``, ``__setstate__``, ``__getattr__``,
    ``__setattr__`` on slots) and for enums with the standard member lookup.
    """
    if not isinstance(cls, type):
        return False
    try:
        if issubclass(cls, enum.Enum):
            return _plain_enum(cls)
        return dataclasses.is_dataclass(cls) and _plain_dataclass(cls)
    except Exception:  # an odd class whose attributes raise is not plain
        return False


def collect_classes(value: Any) -> set[type]:
    """The classes of the dataclass instances and enum members inside ``value``.

    Walks dicts, lists, tuples, sets and dataclass fields; other objects are
    not entered. Each class is returned whether plain or not: the caller decides.
    """
    found: set[type] = set()
    seen: set[int] = set()
    todo = [value]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Mapping):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif isinstance(obj, enum.Enum):
            found.add(type(obj))
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            found.add(type(obj))
            todo.extend(getattr(obj, f.name, None) for f in dataclasses.fields(obj))
    return found


def allow_hparams_classes(checkpoint: Mapping[str, Any]) -> list[str]:
    """Allow-list the plain classes in the checkpoint's hyper-parameters; their names.

    Classes that are not plain are left alone: the save then refuses them with
    ``UnsafeObjectError`` (naming the class) unless the user allowed them.
    """
    classes: set[type] = set()
    for key in HPARAMS_KEYS:
        if key in checkpoint:
            classes |= collect_classes(checkpoint[key])
    names = []
    for cls in sorted(classes, key=class_name):
        if "<locals>" in cls.__qualname__:
            continue  # cannot be pickled by reference anyway; the save says so
        if plain_data_class(cls):
            allow_class(cls)
            names.append(class_name(cls))
    return names


def _resolve(name: str) -> type | None:
    """The class ``"module:qualname"`` names, if its module is imported already."""
    module_name, _, qualname = name.partition(":")
    module = sys.modules.get(module_name)
    if module is None or not qualname:
        return None
    obj: Any = module
    for part in qualname.split("."):
        if part == "<locals>":
            return None
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, type) else None


def allow_recorded(names: Iterable[str]) -> list[str]:
    """Allow the recorded classes that are imported and plain; returns those allowed.

    A checkpoint can name anything, so a name only counts when the class is
    already importable without importing (its module is in ``sys.modules``),
    sits at that name, and passes :func:`plain_data_class`.
    """
    allowed = []
    for name in names:
        if not isinstance(name, str):
            continue
        cls = _resolve(name)
        if cls is None or class_name(cls) != name or not plain_data_class(cls):
            continue
        if not is_allowed(cls.__module__, cls.__qualname__):
            allow_class(cls)
        allowed.append(name)
    return allowed
