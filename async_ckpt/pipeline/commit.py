"""The coordinator's commit: check what is about to be committed, commit it, clean up.

The rule this module keeps (docs/reliability.md, "The invariant"): a save whose
future succeeds leaves a checkpoint that loads. So the metadata is decoded with
the reader's own limits and the save's files are checked to be in storage
before the commit; and the clean-up after it deletes only bytes this save
owns: the files of the metadata it replaced, and leftovers of dead saves that
no writer has touched for ``ORPHAN_GRACE_S``. Files of another writer still in
progress are never deleted, so concurrent saves to one id end with the last
commit winning and both checkpoints loadable until then.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..errors import CheckpointError, SaveFailedError
from ..format.decode import decode_metadata, listed_files
from ..format.encoded import EncodedEntries
from ..format.metadata import Metadata, encode_metadata
from ..settings import env_seconds
from ..storage.base import StorageWriter
from ..storage.retry import RetryPolicy, call_with_retry

log = logging.getLogger(__name__)

# Leftover data files of a save nobody has written to for this long belong to a
# dead save (a killed job, a crashed worker): the next commit to the id removes them.
ORPHAN_GRACE_S = 3600.0


MAX_EXTRA_BYTES = 64 * 1024
"""The most bytes ``Metadata.extra`` may take as JSON: it is read with every load."""
MAX_EXTRA_DEPTH = 4
"""How deep objects may nest inside ``extra`` (``{"metrics": {"loss": 0.1}}`` is depth 2)."""
RESERVED_EXTRA_KEYS = frozenset({"source_format", "dcp_version", "incremental"})
"""Top-level ``extra`` keys the package itself writes (a translated DCP checkpoint)."""
_INT_LIMIT = 2**63


def _plain(value: Any, where: str, depth: int) -> Any:
    """``value`` as a JSON string, number or object of those; CheckpointError otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        raise CheckpointError(
            f"extra{where} is {value!r}: only finite numbers, strings and objects of them "
            "are stored (write a flag as 0/1 or a string)"
        )
    if isinstance(value, numbers.Integral):
        number = int(value)
        if not -_INT_LIMIT <= number < _INT_LIMIT:
            raise CheckpointError(f"extra{where} = {number} does not fit in 64 bits")
        return number
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise CheckpointError(
                f"extra{where} is {number}: only finite numbers are stored (JSON has no "
                "NaN or infinity); skip the value or store it as a string"
            )
        return number
    if isinstance(value, Mapping):
        if depth >= MAX_EXTRA_DEPTH:
            raise CheckpointError(f"extra{where} nests deeper than {MAX_EXTRA_DEPTH} objects")
        return {key: _plain(v, f"{where}[{key!r}]", depth + 1) for key, v in _items(value, where)}
    hint = "; pass value.item() for its number" if hasattr(value, "item") else ""
    raise CheckpointError(
        f"extra{where} is a {type(value).__qualname__}: only finite numbers, strings "
        f"and objects of them are stored{hint}"
    )


def _items(mapping: Mapping, where: str) -> list[tuple[str, Any]]:
    items = list(mapping.items())
    for key, _ in items:
        if not isinstance(key, str) or not key:
            raise CheckpointError(f"extra{where} has key {key!r}: keys must be non-empty strings")
    return items


def check_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """A checked copy of the application data for ``Metadata.extra``, or CheckpointError.

    Keys are non-empty strings; values finite numbers (numpy scalars become
    Python numbers), strings, or objects of those, at most
    :data:`MAX_EXTRA_DEPTH` deep and :data:`MAX_EXTRA_BYTES` as JSON. The keys
    the package writes itself (:data:`RESERVED_EXTRA_KEYS`) are refused. The
    copy is taken at the call, so changing ``extra`` afterwards changes nothing.
    """
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise CheckpointError(f"extra must be a dict, not {type(extra).__qualname__}")
    reserved = sorted(RESERVED_EXTRA_KEYS.intersection(extra))
    if reserved:
        raise CheckpointError(f"extra keys {reserved} are reserved for async_ckpt's own use")
    checked = {key: _plain(v, f"[{key!r}]", 1) for key, v in _items(extra, "")}
    size = len(json.dumps(checked, separators=(",", ":")))
    if size > MAX_EXTRA_BYTES:
        raise CheckpointError(
            f"extra takes {size} bytes as JSON, above the limit of {MAX_EXTRA_BYTES}: it is "
            "meant for a few numbers and names (metrics, a run id), not data"
        )
    return checked


def orphan_grace_s() -> float:
    """The orphan grace in seconds, from ``ASYNC_CKPT_ORPHAN_GRACE_S`` if set."""
    return env_seconds("ASYNC_CKPT_ORPHAN_GRACE_S", ORPHAN_GRACE_S)


def encode_checked(metadata: Metadata) -> tuple[bytes, Metadata]:
    """The metadata's bytes, refused unless the reader would accept them, and what the
    reader decodes from them.

    Decoding with the reader's limits is the one check that cannot drift from
    what a load will do (size limit, number ranges, chunk geometry).
    """
    payload = encode_metadata(metadata)
    try:
        decoded = decode_metadata(payload)
    except CheckpointError as exc:
        raise SaveFailedError(
            f"refusing to commit {metadata.save_id}: a load would reject its metadata ({exc}). "
            "Nothing was committed; the previous checkpoint at this id is untouched."
        ) from exc
    return payload, decoded


def _files_of(payload: bytes | None) -> set[str]:
    """The data files a committed metadata lists; none if it cannot be trusted."""
    if payload is None:
        return set()
    try:
        return listed_files(payload)
    except CheckpointError:
        return set()  # damaged: we cannot tell what it owns, so the sweep decides later


def commit_checkpoint(writer: StorageWriter, metadata: Metadata) -> Metadata:
    """Commit ``metadata`` through ``writer`` and delete only what the commit made stale.

    Returns the committed metadata as a load reads it: its entries are the committed
    bytes (decoded already here, by the check before the commit), so that the result
    crosses processes as those bytes.
    """
    payload, decoded = encode_checked(metadata)
    grace = orphan_grace_s()
    missing = writer.missing_files(metadata.files)
    if missing:
        raise SaveFailedError(
            f"refusing to commit to {writer.checkpoint_id!r}: data file(s) {sorted(missing)[:5]} "
            "of this save are gone (deleted by another process?). Nothing was committed."
        )
    previous = call_with_retry(
        lambda: writer.commit(payload),
        what=f"committing checkpoint {writer.checkpoint_id!r}",
        policy=RetryPolicy.from_env(),
    )
    replaced = _files_of(previous)
    # The commit has happened: clean-up failures cost space, never the checkpoint.
    try:
        writer.remove_files(sorted(replaced - set(metadata.files)))
        writer.sweep_orphans(metadata.files, grace)
    except Exception as exc:
        log.warning("checkpoint %s committed; removing old files failed: %s", metadata.save_id, exc)
    return replace(metadata, entries=EncodedEntries(payload, decoded.entries))
