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

import logging

from ..errors import CheckpointError, SaveFailedError
from ..format.decode import decode_metadata, listed_files
from ..format.metadata import Metadata, encode_metadata
from ..settings import env_seconds
from ..storage.base import StorageWriter
from ..storage.retry import RetryPolicy, call_with_retry

log = logging.getLogger(__name__)

# Leftover data files of a save nobody has written to for this long belong to a
# dead save (a killed job, a crashed worker): the next commit to the id removes them.
ORPHAN_GRACE_S = 3600.0


def orphan_grace_s() -> float:
    """The orphan grace in seconds, from ``ASYNC_CKPT_ORPHAN_GRACE_S`` if set."""
    return env_seconds("ASYNC_CKPT_ORPHAN_GRACE_S", ORPHAN_GRACE_S)


def encode_checked(metadata: Metadata) -> bytes:
    """The metadata's bytes, refused unless the reader would accept them.

    Decoding with the reader's limits is the one check that cannot drift from
    what a load will do (size limit, number ranges, chunk geometry).
    """
    payload = encode_metadata(metadata)
    try:
        decode_metadata(payload)
    except CheckpointError as exc:
        raise SaveFailedError(
            f"refusing to commit {metadata.save_id}: a load would reject its metadata ({exc}). "
            "Nothing was committed; the previous checkpoint at this id is untouched."
        ) from exc
    return payload


def _files_of(payload: bytes | None) -> set[str]:
    """The data files a committed metadata lists; none if it cannot be trusted."""
    if payload is None:
        return set()
    try:
        return listed_files(payload)
    except CheckpointError:
        return set()  # damaged: we cannot tell what it owns, so the sweep decides later


def commit_checkpoint(writer: StorageWriter, metadata: Metadata) -> None:
    """Commit ``metadata`` through ``writer`` and delete only what the commit made stale."""
    payload = encode_checked(metadata)
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
