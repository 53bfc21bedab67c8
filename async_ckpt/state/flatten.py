"""Nested state dicts <-> flat ``{key: leaf}`` maps, and back into the caller's objects.

Keys are the path components joined with ``.`` (``"model.layer.0.weight"``),
as in torch.distributed.checkpoint. Dict keys may be ``str`` or ``int`` (torch
optimizers key their state by int); lists and tuples are indexed. Objects with
``state_dict()``/``load_state_dict()`` (modules, optimizers, schedulers) are
flattened through ``state_dict()`` and restored through ``load_state_dict()``.

Those calls may run collectives (FSDP gathers optimizer state), so every rank
must make them in the same order whatever the insertion order of its dicts:
``flatten`` asks the Stateful objects for their state after the rest of the
walk, in key order; loads call ``load_state_dict`` deepest first, ties by key.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import StateDictError

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


def flatten(state_dict: Mapping[str, Any], states: Mapping[str, Any] | None = None) -> Flat:
    """Flatten ``state_dict``; colliding keys or unsupported keys raise StateDictError.

    ``states``: the Stateful objects' states, taken earlier by :func:`take_states`
    (on the caller's thread); without it their ``state_dict()`` is called here.
    """
    _check_top(state_dict)
    flat = Flat()
    deferred = _Deferred()
    flat.root = _visit(state_dict, (), flat, set(), deferred)
    # Stateful objects in key order (also those found inside another's state), so that
    # state_dict() calls that run collectives pair up across ranks.
    while deferred:
        key, path, obj, active = deferred.pop()
        if states is None:
            obj_state = obj.state_dict()
        elif key in states:
            obj_state = states[key]
        else:
            raise StateDictError(
                f"{key!r} became a Stateful object after the save call; with async_staging "
                "the state must not change until fut.staged is done"
            )
        flat.stateful[key] = (obj, obj_state)
        _visit_value(obj_state, path, flat, set(active), deferred)
    return flat


def take_states(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Call every Stateful object's ``state_dict()`` now, in :func:`flatten`'s order, and
    walk nothing else: those calls may run collectives, so they stay on the caller's
    thread, while the flatten itself (per-leaf work) may run on another."""
    _check_top(state_dict)
    deferred = _Deferred()
    _find_stateful_in(state_dict, (), set(), deferred)
    states: dict[str, Any] = {}
    while deferred:
        key, path, obj, active = deferred.pop()
        states[key] = obj.state_dict()
        _find_stateful_in(states[key], path, set(active), deferred)
    return states


def _check_top(state_dict: Any) -> None:
    if not isinstance(state_dict, Mapping):
        raise StateDictError(
            f"a state dict must be a dict (or Mapping), got {type(state_dict).__qualname__}"
        )


def _find_stateful_in(obj: Any, path: KeyPath, active: set[int], deferred: _Deferred) -> None:
    """The Stateful objects inside container ``obj``, added to ``deferred``."""
    if not isinstance(obj, (Mapping, list, tuple)):
        return
    values = obj.values() if isinstance(obj, Mapping) else obj
    if set(map(type, values)) <= _PLAIN_LEAVES:  # C-level: a dict of 100k tensors is done
        return
    if id(obj) in active:
        raise StateDictError(f"the state dict contains itself at {key_of(path)!r}")
    active.add(id(obj))
    for k, v in obj.items() if isinstance(obj, Mapping) else enumerate(obj):
        if type(v) in _PLAIN_LEAVES or isinstance(v, torch.Tensor):
            continue
        if is_stateful(v):
            deferred.add((*path, k), v, active)
        else:
            _find_stateful_in(v, (*path, k), active, deferred)
    active.discard(id(obj))


class _Deferred:
    """Stateful objects met during the walk, asked for their state later, smallest key first.

    A heap of keys: only the Stateful objects are ordered, never the (many) plain leaves.
    """

    def __init__(self) -> None:
        self._heap: list[str] = []
        self._found: dict[str, tuple[KeyPath, Any, frozenset[int]]] = {}

    def __bool__(self) -> bool:
        return bool(self._heap)

    def add(self, path: KeyPath, obj: Any, active: set[int]) -> None:
        key = key_of(path)
        if key in self._found:
            raise _same_key(key)
        if id(obj) in active:
            raise StateDictError(f"the state dict contains itself at {key!r}")
        # the ancestors (and the object itself), for the cycle check inside its state
        self._found[key] = (path, obj, frozenset(active) | {id(obj)})
        heapq.heappush(self._heap, key)

    def pop(self) -> tuple[str, KeyPath, Any, frozenset[int]]:
        key = heapq.heappop(self._heap)
        return (key, *self._found.pop(key))


def _add(flat: Flat, path: KeyPath, kind: str | None, leaf: Any = None) -> None:
    key = key_of(path)
    if not key.isascii():
        _check_encodable(key)
    if key in flat.paths or key in flat.containers:
        raise _same_key(key)
    if kind is None:
        flat.leaves[key] = leaf
        flat.paths[key] = path
    else:
        flat.containers[key] = kind


def _same_key(key: str) -> StateDictError:
    return StateDictError(
        f"two entries flatten to the same key {key!r}; rename one (keys are joined with '.')"
    )


def _check_encodable(key: str) -> None:
    """Keys are stored as UTF-8: a lone surrogate (from a bad decode) cannot be."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StateDictError(
            f"key {key!r} cannot be stored: it is not valid Unicode ({exc.reason} at "
            f"position {exc.start}); rename it"
        ) from None


# Leaves that are never containers or Stateful: skip the abstract-class checks for them
# (most of a state's nodes are tensors and numbers).
_PLAIN_LEAVES = frozenset({torch.Tensor, torch.nn.Parameter, int, float, str, bool, type(None)})


def _visit(obj: Any, path: KeyPath, flat: Flat, active: set[int], deferred: _Deferred) -> Any:
    if type(obj) in _PLAIN_LEAVES and path:
        _add(flat, path, None, obj)
        return obj
    if is_stateful(obj):  # its state_dict() is called later, in key order (see flatten)
        deferred.add(path, obj, active)
        return obj
    return _visit_value(obj, path, flat, active, deferred)


def _visit_value(obj: Any, path: KeyPath, flat: Flat, active: set[int], deferred: _Deferred) -> Any:
    """A container (walked into) or a leaf; what a Stateful object's state_dict() gave too."""
    if isinstance(obj, (Mapping, list, tuple)):
        if id(obj) in active:
            raise StateDictError(f"the state dict contains itself at {key_of(path)!r}")
        active.add(id(obj))
        if isinstance(obj, Mapping):
            _add(flat, path, "dict")
            items: Any = obj.items()
        else:
            _add(flat, path, "tuple" if isinstance(obj, tuple) else "list")
            items = enumerate(obj)
        _visit_children(list(items), path, flat, active, deferred, isinstance(obj, Mapping))
        active.discard(id(obj))
        return obj
    if not path:
        raise StateDictError("the top of a state dict must be a dict")
    _add(flat, path, None, obj)
    return obj


def _visit_children(
    items: list[tuple[Any, Any]],
    path: KeyPath,
    flat: Flat,
    active: set[int],
    deferred: _Deferred,
    mapping: bool,
) -> None:
    """A container's children. Plain leaves (most of a big state) are added inline: the
    per-leaf cost of 100k tensors is the caller's stall."""
    if mapping:
        for k, _ in items:
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise StateDictError(
                    f"key {k!r} under {key_of(path)!r} is a {type(k).__qualname__}; "
                    "state dict keys must be str or int"
                )
    prefix = key_of(path) + "." if path else ""
    leaves, paths, containers = flat.leaves, flat.paths, flat.containers
    for k, v in items:
        if type(v) not in _PLAIN_LEAVES:
            _visit(v, (*path, k), flat, active, deferred)
            continue
        key = prefix + (k if type(k) is str else str(k))  # == key_of((*path, k))
        if not key.isascii():
            _check_encodable(key)
        if key in paths or key in containers:
            raise _same_key(key)
        leaves[key] = v
        paths[key] = (*path, k)


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
