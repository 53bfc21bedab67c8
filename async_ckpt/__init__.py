"""async_ckpt: PyTorch checkpoints that do not stop training.

Stage the state in reused shared memory, hand it to a persistent worker
process that plans, validates, writes and commits atomically, and keep
training. See README.md and docs/.
"""

from .api import (
    assert_same_keys,
    async_save,
    close_async_saves,
    delete,
    load,
    load_state_dict,
    save,
    save_state_dict,
)
from .dcp_compat import AsyncCheckpointerType, DefaultLoadPlanner, DefaultSavePlanner
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    KeyMismatchError,
    LoadFailedError,
    MetadataChecksumError,
    MetadataError,
    MissingBackendError,
    RankMismatchError,
    RanksMissingError,
    SaveFailedError,
    SaveInProgressError,
    SaveTimeoutError,
    ShapeMismatchError,
    StateDictError,
    StorageDetectionError,
    UnsafeObjectError,
    WorkerDiedError,
)
from .executor import AsyncCheckpointer, SaveFuture, SaveStats
from .format.allow_list import allow_class, allow_global, allow_module
from .format.metadata import Metadata
from .manager import CheckpointManager
from .materialize import materialize, read_entry
from .pipeline.load import LoadResult
from .staging import Stager, StagerOptions
from .storage import (
    FileSystemReader,
    FileSystemWriter,
    FsspecReader,
    FsspecWriter,
    StorageReader,
    StorageWriter,
)

CheckpointException = CheckpointError
"""torch.distributed.checkpoint's name for its base error: ``except CheckpointException``
in DCP code catches every async_ckpt error."""

__version__ = "0.1.0"

__all__ = [
    "AsyncCheckpointer",
    "AsyncCheckpointerType",
    "CheckpointException",
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "LoadFailedError",
    "load_state_dict",
    "save_state_dict",
    "CheckpointManager",
    "SaveFuture",
    "SaveStats",
    "Stager",
    "StagerOptions",
    "async_save",
    "close_async_saves",
    "delete",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CheckpointReplacedError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "FileSystemReader",
    "FileSystemWriter",
    "FsspecReader",
    "FsspecWriter",
    "IncompleteCheckpointError",
    "KeyMismatchError",
    "LoadResult",
    "Metadata",
    "MetadataChecksumError",
    "MetadataError",
    "MissingBackendError",
    "RankMismatchError",
    "RanksMissingError",
    "SaveFailedError",
    "SaveInProgressError",
    "SaveTimeoutError",
    "ShapeMismatchError",
    "StateDictError",
    "StorageDetectionError",
    "StorageReader",
    "StorageWriter",
    "UnsafeObjectError",
    "WorkerDiedError",
    "allow_class",
    "allow_global",
    "allow_module",
    "assert_same_keys",
    "load",
    "materialize",
    "read_entry",
    "save",
]
