"""Load a whole checkpoint without a template: rebuild its nested state from the metadata.

``load`` fills a state dict the caller built (a model, an optimizer). Tools
that have no model (the command-line converter, notebooks) use
:func:`materialize`, which builds an empty target from the metadata's
containers and entries, loads into it (checksums verified) and returns plain
nested dicts, lists and tuples of CPU tensors, numpy arrays and values.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import torch

from .errors import KeyMismatchError
from .format.dtypes import dtype_from_name
from .format.metadata import Metadata, TensorEntry
from .pipeline.load import run_load
from .state.flatten import KeyPath, key_of
from .storage.base import StorageReader, checkpoint_metadata
from .storage.detect import detect_reader


def _placeholder(entry: Any) -> Any:
    if not isinstance(entry, TensorEntry):
        return None  # values and objects are replaced by the load
    tensor = torch.empty(entry.shape, dtype=dtype_from_name(entry.dtype))
    return tensor.numpy() if entry.numpy else tensor


def _child(node: Any, part: str | int, kind: str) -> Any:
    """``node[part]``, created as an empty container of ``kind`` if missing."""
    new: Any = {} if kind == "dict" else []
    if isinstance(node, list):
        while len(node) <= part:  # type: ignore[operator]
            node.append(None)
        if node[part] is None:  # type: ignore[index]
            node[part] = new  # type: ignore[index]
        return node[part]  # type: ignore[index]
    return node.setdefault(part, new)


def _place(root: dict, path: KeyPath, value: Any, containers: dict[str, str]) -> None:
    node: Any = root
    for n, part in enumerate(path[:-1]):
        node = _child(node, part, containers.get(key_of(path[: n + 1]), "dict"))
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:  # type: ignore[operator]
            node.append(None)
    node[last] = value


def _empty_containers(root: dict, meta: Metadata) -> None:
    """Create the containers no entry lies under (``{"state": {}}`` of a fresh optimizer)."""
    known: dict[str, KeyPath] = {"": ()}
    for entry in meta.entries.values():
        for n in range(1, len(entry.path)):
            known[key_of(entry.path[:n])] = entry.path[:n]
    for key in sorted(meta.containers, key=len):
        if key in known:
            continue
        parent = max((k for k in known if k == "" or key.startswith(k + ".")), key=len)
        name = key[len(parent) + 1 :] if parent else key
        part: str | int = name
        if meta.containers.get(parent, "dict") != "dict" and name.isdigit():
            part = int(name)
        path = (*known[parent], part)
        _place(root, path, {} if meta.containers[key] == "dict" else [], meta.containers)
        known[key] = path


def _freeze(node: Any, path: KeyPath, containers: dict[str, str]) -> Any:
    """Turn the lists recorded as tuples back into tuples, bottom up."""
    if isinstance(node, dict):
        for k in list(node):
            node[k] = _freeze(node[k], (*path, k), containers)
        return node
    if isinstance(node, list):
        items = [_freeze(v, (*path, i), containers) for i, v in enumerate(node)]
        return tuple(items) if containers.get(key_of(path)) == "tuple" else items
    return node


def empty_state(meta: Metadata) -> dict[str, Any]:
    """A nested state shaped like the checkpoint: empty tensors, None for other leaves.

    Tuples are built as lists here (so that the load can fill them); see
    :func:`materialize` for the finished state.
    """
    root: dict[str, Any] = {}
    for entry in meta.entries.values():
        _place(root, entry.path, _placeholder(entry), meta.containers)
    _empty_containers(root, meta)
    return root


def select(meta: Metadata, keys: Iterable[str]) -> Metadata:
    """The part of ``meta`` under ``keys`` (flat keys or their prefixes, e.g. ``"model"``).

    Raises KeyMismatchError naming the keys that match nothing.
    """
    wanted = list(dict.fromkeys(keys))

    def under(key: str) -> bool:
        return any(key == w or key.startswith(w + ".") for w in wanted)

    entries = {k: e for k, e in meta.entries.items() if under(k)}
    unknown = [w for w in wanted if not any(k == w or k.startswith(w + ".") for k in entries)]
    unknown = [w for w in unknown if w not in meta.containers]  # an empty container is fine
    if unknown:
        raise KeyMismatchError(
            f"checkpoint has no key {unknown[0]!r}{f' (nor {unknown[1:]})' if unknown[1:] else ''}"
            "; list its keys with `async-ckpt inspect ID`",
            missing=unknown,
            unexpected=[],
        )
    # containers on the way to a selected key, and those inside a selected prefix
    containers = {
        k: kind
        for k, kind in meta.containers.items()
        if under(k) or any(w.startswith(k + ".") for w in wanted)
    }
    return dataclasses.replace(meta, entries=entries, containers=containers)


def materialize(
    checkpoint_id: str | os.PathLike | None = None,
    *,
    keys: Iterable[str] | None = None,
    storage_reader: StorageReader | None = None,
    metadata: Metadata | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """The checkpoint's state as nested dicts/lists/tuples of CPU tensors and values.

    ``keys`` (flat keys, or prefixes such as ``"model"``) selects part of it:
    only those entries are read, the rest of the checkpoint is not touched (list
    items left out of a selection are None).
    Needs memory for every tensor selected. Checksums are verified unless
    ``verify=False``; damaged data raises as :func:`async_ckpt.load` does. A
    torch.distributed.checkpoint directory is read too (it has no checksums).
    ``metadata`` is the checkpoint's, when the caller has decoded it already.
    """
    reader = storage_reader or detect_reader(checkpoint_id)
    try:
        meta = metadata if metadata is not None else checkpoint_metadata(reader)
        if keys is not None:
            meta = select(meta, [keys] if isinstance(keys, str) else keys)
    except BaseException:
        reader.close()
        raise
    state = empty_state(meta)
    # A selection inside a list pads the items it leaves out with None: not keys to load.
    run_load(state, reader, strict=keys is None, verify=verify, metadata=meta)
    return _freeze(state, (), meta.containers)


def read_entry(
    checkpoint_id: str | os.PathLike | None = None,
    key: str = "",
    *,
    storage_reader: StorageReader | None = None,
    verify: bool = True,
) -> Any:
    """One entry of a checkpoint by its flat key (a tensor, array, value or object),
    or the nested state under a prefix; nothing else is read."""
    if not key:
        raise ValueError("read_entry needs the key of an entry (see `async-ckpt inspect ID`)")
    reader = storage_reader or detect_reader(checkpoint_id)
    try:
        meta = checkpoint_metadata(reader)
    except BaseException:
        reader.close()
        raise
    state = materialize(storage_reader=reader, metadata=meta, keys=[key], verify=verify)
    path = meta.entries[key].path if key in meta.entries else _container_path(meta, key)
    return leaf_at(state, path)


def leaf_at(state: Any, path: KeyPath) -> Any:
    """What sits at ``path`` in a nested state."""
    for part in path:
        state = state[part]
    return state


def entry_metadata(meta: Metadata, key: str) -> Metadata:
    """``meta`` cut to the one entry ``key`` and the containers above it.

    What :func:`select` gives for a single entry key, in time independent of
    the checkpoint's size: a caller reading entry after entry (a streaming
    conversion) would otherwise pay a pass over every entry per entry.
    """
    entry = meta.entries[key]
    above = (key_of(entry.path[:n]) for n in range(1, len(entry.path)))
    containers = {k: meta.containers[k] for k in above if k in meta.containers}
    return dataclasses.replace(meta, entries={key: entry}, containers=containers)


def _container_path(meta: Metadata, key: str) -> KeyPath:
    """The path of container ``key``, from an entry under it (or from the key itself)."""
    for entry in meta.entries.values():
        for n in range(1, len(entry.path)):
            if key_of(entry.path[:n]) == key:
                return entry.path[:n]
    return (key,)  # an empty top-level container
