"""CheckpointManager: periodic asynchronous saves under one root, retention, resume.

``checkpoint_manager`` (the manager), ``retention`` (what it keeps and
removes), ``root`` (the step directories under its root, on a storage
backend's :class:`~async_ckpt.storage.base.StorageRoot`).
"""

from .checkpoint_manager import CheckpointManager
from .retention import INCOMPLETE_GRACE_ENV, INCOMPLETE_GRACE_S
from .root import StepInfo, StepStore

__all__ = [
    "INCOMPLETE_GRACE_ENV",
    "INCOMPLETE_GRACE_S",
    "CheckpointManager",
    "StepInfo",
    "StepStore",
]
