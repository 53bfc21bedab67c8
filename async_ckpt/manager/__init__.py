"""CheckpointManager: periodic asynchronous saves under one root, retention, resume.

``checkpoint_manager`` (the manager), ``saves`` (its save in flight),
``restore`` (from memory or storage), ``retention`` (what it keeps and
removes), ``root`` (the step directories under its root, on a storage
backend's :class:`~async_ckpt.storage.base.StorageRoot`), ``preemption``,
``metrics`` (best-k), ``options``; the memory tier: ``memory_tier``,
``memory_store``, ``memory_restore``.
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
