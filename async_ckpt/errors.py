"""The one exception hierarchy of async_ckpt.

Every error the library raises on purpose derives from :class:`CheckpointError`
(an ``Exception``, so ``except Exception`` catches it). Each message names what
is wrong (key, rank, file, setting) and what to do next.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by async_ckpt."""


class StorageDetectionError(CheckpointError, RuntimeError):
    """No storage backend accepts the checkpoint id ("Cannot detect ...")."""


class MissingBackendError(CheckpointError, ImportError):
    """A storage backend needs an optional package that is not installed."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """The checkpoint id is taken and the writer was told not to overwrite."""


class IncompleteCheckpointError(CheckpointError):
    """The checkpoint has no committed metadata: a save never finished."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Nothing exists at the checkpoint id."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes or metadata are damaged, truncated or inconsistent."""


class CheckpointReplacedError(CheckpointError):
    """The checkpoint was overwritten by a newer save while it was being loaded; load again."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A chunk's bytes do not match the checksum recorded at save time."""


class MetadataError(CorruptCheckpointError):
    """The metadata file is malformed, from an unknown format version, or hostile."""


class MetadataChecksumError(MetadataError, ChecksumMismatchError):
    """The metadata file's bytes do not match the checksum it carries."""


class UnsafeObjectError(CheckpointError):
    """An object entry would need code that is not allow-listed to be decoded."""


class StateDictError(CheckpointError, ValueError):
    """The state dict given to save/load has an unsupported shape or leaf."""


class KeyMismatchError(CheckpointError, KeyError):
    """Keys requested by load and keys stored in the checkpoint disagree."""

    def __init__(self, message: str, *, missing: list[str], unexpected: list[str]) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class ShapeMismatchError(CheckpointError, ValueError):
    """A stored tensor's shape or dtype does not fit the tensor it loads into."""


class RankMismatchError(CheckpointError, AssertionError):
    """Ranks disagree on the keys (or shapes/dtypes) of the state they save."""


class RanksMissingError(CheckpointError, TimeoutError):
    """A collective checkpoint call was not made by every rank of the group in time.

    ``missing`` lists the ranks that never arrived (see ASYNC_CKPT_ARRIVAL_TIMEOUT_S).
    """

    def __init__(self, message: str, *, missing: list[int] | None = None) -> None:
        super().__init__(message)  # the default lets it unpickle (from the worker)
        self.missing = missing or []


class LoadFailedError(CheckpointError):
    """A collective load failed on other ranks; ``failures`` maps each such rank to its error."""

    def __init__(self, message: str, *, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or {}


class SaveFailedError(CheckpointError):
    """A save failed on one or more ranks; nothing was committed."""

    def __init__(self, message: str, *, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or {}


class WorkerDiedError(SaveFailedError):
    """The background worker process exited while a save was in flight."""


class SaveTimeoutError(SaveFailedError, TimeoutError):
    """A save did not finish within its timeout."""


class SaveInProgressError(CheckpointError):
    """A save was started while the previous one is still running."""
