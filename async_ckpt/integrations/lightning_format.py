"""What AsyncCkptIO stores besides Lightning's dict, and how a load gives that dict back.

A save adds one key, :data:`RECORD_KEY`, holding plain values: the
hyper-parameter classes the plugin allow-listed (see ``lightning_hparams``) and
the module versions of ``state_dict()._metadata`` (``load_state_dict``
migrations read them; a stored state dict is a plain dict otherwise). A load
reads the checkpoint into CPU memory, consumes that record (allowing the
recorded classes again, giving the state dict its ``_metadata`` back) and
moves the tensors as ``map_location`` says, with ``torch.load``'s meaning.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from ..format.metadata import Metadata, ValueEntry
from ..format.objects import decode_plain
from ..materialize import materialize
from ..storage.base import checkpoint_metadata
from ..storage.detect import detect_reader
from .lightning_hparams import allow_hparams_classes, allow_recorded

RECORD_KEY = "_async_ckpt"


# ---------------------------------------------------------------------------- paths
def is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def is_async_ckpt_checkpoint(path: Any) -> bool:
    """Whether ``path`` is for async_ckpt to read: a committed checkpoint, or a local
    directory that is not a torch.distributed.checkpoint one (an unfinished save then
    reports itself as incomplete instead of failing as "is a directory")."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fspath(path)
    if is_url(text):
        if text.startswith(("http://", "https://")):
            return False  # Lightning downloads those; probing would cost a request
        try:
            import fsspec

            fs, inner = fsspec.core.url_to_fs(text)
            return bool(fs.isfile(inner.rstrip("/") + "/metadata.json"))
        except Exception:
            return False
    local = text.removeprefix("file://")
    if not os.path.isdir(local):
        return False
    return os.path.isfile(os.path.join(local, "metadata.json")) or not os.path.exists(
        os.path.join(local, ".metadata")
    )


def identity(path: Any) -> str:
    """One spelling per checkpoint path, to tell whether two paths are the same."""
    text = os.fspath(path)
    if is_url(text):
        return text.rstrip("/")
    return os.path.abspath(text.removeprefix("file://"))


# ---------------------------------------------------------------------------- save side
def _metadata_json(state: Any) -> str | None:
    metadata = getattr(state, "_metadata", None)
    if not isinstance(metadata, dict):
        return None
    try:
        return json.dumps(metadata)
    except (TypeError, ValueError):
        return None  # not plain: the load falls back to what load_state_dict assumes


def state_to_save(checkpoint: Mapping[str, Any], allow_classes: bool) -> dict[str, Any]:
    """``checkpoint`` plus the record (the caller's dict is left as it was)."""
    if RECORD_KEY in checkpoint:
        raise ValueError(
            f"the checkpoint dict has a key {RECORD_KEY!r}, which AsyncCkptIO reserves; "
            "rename it (on_save_checkpoint)"
        )
    classes = allow_hparams_classes(checkpoint) if allow_classes else []
    record: dict[str, Any] = {"classes": classes}
    sd_metadata = _metadata_json(checkpoint.get("state_dict"))
    if sd_metadata is not None:
        record["state_dict_metadata"] = sd_metadata
    top_metadata = _metadata_json(checkpoint)
    if top_metadata is not None:
        record["top_metadata"] = top_metadata
    return {**checkpoint, RECORD_KEY: record}


# ---------------------------------------------------------------------------- load side
def _read_metadata(path: Any) -> Metadata:
    reader = detect_reader(path)
    try:
        return checkpoint_metadata(reader)
    finally:
        reader.close()


def _recorded_classes(meta: Metadata) -> list[str]:
    names = []
    for entry in meta.entries.values():
        if isinstance(entry, ValueEntry) and entry.path[:2] == (RECORD_KEY, "classes"):
            value = decode_plain(entry.value)
            if isinstance(value, str):
                names.append(value)
    return names


def _map_tensor(tensor: torch.Tensor, map_location: Any) -> torch.Tensor:
    """``tensor`` (on the CPU, where every load puts it) moved as torch.load would."""
    if isinstance(map_location, (str, torch.device)):
        return tensor.to(map_location)
    if isinstance(map_location, Mapping):  # {saved location: new location}
        target = map_location.get("cpu")
        return tensor.to(target) if target is not None else tensor
    if callable(map_location):  # fn(storage, location) -> storage or None, as in torch.load
        storage = tensor.untyped_storage()
        moved = map_location(storage, "cpu")
        if moved is None or moved is storage:
            return tensor
        if isinstance(moved, torch.TypedStorage):
            moved = moved.untyped()
        if not isinstance(moved, torch.UntypedStorage):
            raise TypeError(
                f"map_location returned a {type(moved).__qualname__}; it must return a storage "
                "or None, as for torch.load"
            )
        out = torch.empty(0, dtype=tensor.dtype, device=moved.device)
        return out.set_(moved, tensor.storage_offset(), tensor.size(), tensor.stride())
    raise TypeError(
        f"map_location must be a str, torch.device, dict or callable, not {type(map_location)!r}"
    )


def _map_all(node: Any, map_location: Any) -> Any:
    if isinstance(node, torch.Tensor):
        return _map_tensor(node, map_location)
    if isinstance(node, dict):
        for key, value in node.items():
            node[key] = _map_all(value, map_location)
        return node
    if isinstance(node, list):
        node[:] = [_map_all(v, map_location) for v in node]
        return node
    if isinstance(node, tuple):
        return tuple(_map_all(v, map_location) for v in node)
    return node


def _with_module_metadata(state: Any, text: Any) -> Any:
    """``state`` as an OrderedDict carrying ``_metadata`` again (``nn.Module.state_dict``'s)."""
    if not isinstance(state, dict) or not isinstance(text, str):
        return state
    try:
        metadata = json.loads(text)
    except ValueError:
        return state
    out = OrderedDict(state)
    out._metadata = metadata  # type: ignore[attr-defined]
    return out


def read_checkpoint(path: Any, map_location: Any = None, *, verify: bool = True) -> dict[str, Any]:
    """The dict saved at ``path``: read, record consumed, tensors mapped."""
    meta = _read_metadata(path)
    allow_recorded(_recorded_classes(meta))
    state = materialize(path, metadata=meta, verify=verify)
    record = state.pop(RECORD_KEY, None)
    if isinstance(record, dict):
        if "state_dict" in state:
            state["state_dict"] = _with_module_metadata(
                state["state_dict"], record.get("state_dict_metadata")
            )
        top = record.get("top_metadata")
        if top is not None:
            state = _with_module_metadata(state, top)
    if map_location is not None:
        state = _map_all(state, map_location)
    return state
