"""Nested state dicts <-> flat ``{key: leaf}`` maps, and back into the caller's objects.

Keys are the path components joined with ``.`` (``"model.layer.0.weight"``),
as in torch.distributed.checkpoint. Dict keys may be ``str`` or ``int`` (torch
optimizers key their state by int); lists and tuples are indexed. Objects with
``state_dict()``/``load_state_dict()`` (modules, optimizers, schedulers) are
flattened through ``state_dict()`` and restored through ``load_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import StateDictError

KeyPath = tuple[str | int, ...]


def is_stateful(obj: Any) -> bool:
    """Whether ``obj`` saves and restores itself via ``state_dict``/``load_state_dict``."""
    return (
        not isinstance(obj, Mapping)
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


def key_of(path: KeyPath) -> str:
    """The flat key of a path (``("optim", "state", 0)`` -> ``"optim.state.0"``)."""
    return ".".join(str(p) for p in path)


@dataclass
class Flat:
    """A flattened state: leaves, their paths, the containers, the Stateful objects."""

    leaves: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, KeyPath] = field(default_factory=dict)
    containers: dict[str, str] = field(default_factory=dict)
    stateful: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (obj, its dict)
    root: Any = None


def flatten(state_dict: Mapping[str, Any]) -> Flat:
    """Flatten ``state_dict``; colliding keys or unsupported keys raise StateDictError."""
    if not isinstance(state_dict, Mapping):
        raise StateDictError(
            f"a state dict must be a dict (or Mapping), got {type(state_dict).__qualname__}"
        )
    flat = Flat()
    flat.root = _visit(state_dict, (), flat, set())
    return flat


def _add(flat: Flat, path: KeyPath, kind: str | None, leaf: Any = None) -> None:
    key = key_of(path)
    if key in flat.paths or key in flat.containers:
        raise StateDictError(
            f"two entries flatten to the same key {key!r}; rename one (keys are joined with '.')"
        )
    if kind is None:
        flat.leaves[key] = leaf
        flat.paths[key] = path
    else:
        flat.containers[key] = kind


# Leaves that are never containers or Stateful: skip the abstract-class checks for them
# (most of a state's nodes are tensors and numbers).
_PLAIN_LEAVES = frozenset({torch.Tensor, torch.nn.Parameter, int, float, str, bool, type(None)})


def _visit(obj: Any, path: KeyPath, flat: Flat, active: set[int]) -> Any:
    if type(obj) in _PLAIN_LEAVES and path:
        _add(flat, path, None, obj)
        return obj
    if is_stateful(obj):
        obj_state = obj.state_dict()
        flat.stateful[key_of(path)] = (obj, obj_state)
        obj = obj_state
    if isinstance(obj, (Mapping, list, tuple)):
        if id(obj) in active:
            raise StateDictError(f"the state dict contains itself at {key_of(path)!r}")
        active.add(id(obj))
        if isinstance(obj, Mapping):
            _add(flat, path, "dict")
            items = list(obj.items())
            for k, _ in items:
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise StateDictError(
                        f"key {k!r} under {key_of(path)!r} is a {type(k).__qualname__}; "
                        "state dict keys must be str or int"
                    )
        else:
            _add(flat, path, "tuple" if isinstance(obj, tuple) else "list")
            items = list(enumerate(obj))
        for k, v in items:
            _visit(v, (*path, k), flat, active)
        active.discard(id(obj))
        return obj
    if not path:
        raise StateDictError("the top of a state dict must be a dict")
    _add(flat, path, None, obj)
    return obj


def _empty(kind: str) -> Any:
    return {} if kind == "dict" else []


def _set(node: Any, path: KeyPath, value: Any, kinds: list[str], max_index: int) -> Any:
    """``node`` with ``node[path] = value``; missing containers are made of ``kinds``."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if node is None:
        node = _empty(kinds[0])
        if kinds[0] == "tuple":
            node = tuple(node)
    if isinstance(node, (list, tuple)):
        if not isinstance(head, int) or isinstance(head, bool) or not 0 <= head < max_index:
            raise StateDictError(
                f"cannot place a loaded leaf at index {head!r} of a {type(node).__qualname__}: "
                "the checkpoint's structure does not fit the state dict"
            )
    elif not isinstance(node, MutableMapping):
        raise StateDictError(
            f"cannot place a loaded leaf under {head!r} inside a {type(node).__qualname__}: "
            "the checkpoint's structure does not fit the state dict"
        )
    if isinstance(node, tuple):
        items = list(node)
        while len(items) <= head:
            items.append(None)
        items[head] = _set(items[head], rest, value, kinds[1:], max_index)
        # namedtuples take fields as arguments; other tuple types (torch.Size) an iterable
        return type(node)(*items) if hasattr(type(node), "_fields") else type(node)(items)
    if isinstance(node, list):
        while len(node) <= head:
            node.append(None)
        child = node[head]
    else:
        child = node.get(head)
    node[head] = _set(child, rest, value, kinds[1:], max_index) if rest else value
    return node


def set_leaf(
    flat: Flat,
    path: KeyPath,
    value: Any,
    containers: dict[str, str],
    *,
    max_index: int = 2**31,
) -> None:
    """Set the leaf at ``path`` inside the flattened state's own objects, in place.

    Inside a Stateful object the path continues in the dict its ``state_dict()``
    returned (later handed to ``load_state_dict``). Tuples are rebuilt; missing
    containers are created with the kinds recorded in ``containers``. List
    indices at or above ``max_index`` are refused (a list grows to fit an index).
    """
    start, root = 0, flat.root
    for n in range(len(path), -1, -1):
        if key_of(path[:n]) in flat.stateful and (n > 0 or "" in flat.stateful):
            start, root = n, flat.stateful[key_of(path[:n])][1]
            break
    kinds = [containers.get(key_of(path[:n]), "dict") for n in range(start, len(path))]
    _set(root, path[start:], value, kinds, max_index)
