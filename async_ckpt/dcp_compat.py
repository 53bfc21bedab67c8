"""torch.distributed.checkpoint's keywords and types, mapped onto async_ckpt's.

Code written for DCP passes planners, checkpointer types, stagers and storage
objects of DCP's own; this module decides for each one what it means here:
honoured (a partial-load planner, a thread checkpointer, an async stager),
accepted as a no-op, or refused with an error that names what to use instead.
Nothing here imports torch.distributed.checkpoint: DCP's objects are recognised
by their class, so the import cost is paid only by code that uses them.
"""

from __future__ import annotations

import enum
import weakref
from typing import Any, Literal

from .staging import Stager, StagerOptions
from .storage.base import StorageReader, StorageWriter

_DCP = "torch.distributed.checkpoint"


class DefaultSavePlanner:
    """DCP's default save planner, for code that passes one explicitly.

    async_ckpt plans saves itself (flattening, deduplication of replicated
    chunks and a cached global plan are always on), so the options are accepted
    for compatibility and have no effect.
    """

    def __init__(
        self,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        dedup_replicated_tensors: bool | None = None,
        dedup_save_to_lowest_rank: bool = False,
        enable_plan_caching: bool = False,
    ) -> None:
        self.flatten_state_dict = flatten_state_dict
        self.flatten_sharded_tensors = flatten_sharded_tensors
        self.dedup_save_to_lowest_rank = dedup_save_to_lowest_rank
        self.enable_plan_caching = enable_plan_caching


class DefaultLoadPlanner:
    """DCP's default load planner; ``allow_partial_load=True`` loads the keys present
    (``strict=False``), other options are accepted and have no effect."""

    def __init__(
        self,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        allow_partial_load: bool = False,
    ) -> None:
        self.flatten_state_dict = flatten_state_dict
        self.flatten_sharded_tensors = flatten_sharded_tensors
        self.allow_partial_load = allow_partial_load


class AsyncCheckpointerType(enum.Enum):
    """Where ``async_save`` writes from: a worker ``PROCESS`` (the default) or a ``THREAD``."""

    THREAD = "thread"
    PROCESS = "process"


def _is_dcp(obj: Any, *names: str) -> bool:
    return _from_dcp(obj) and type(obj).__name__ in names


def partial_load(planner: Any) -> bool:
    """Whether a load ``planner`` asks for a partial load; refuses custom planners."""
    if planner is None:
        return False
    if isinstance(planner, DefaultLoadPlanner) or _is_dcp(planner, "DefaultLoadPlanner"):
        return bool(getattr(planner, "allow_partial_load", False))
    raise NotImplementedError(
        f"planner={type(planner).__qualname__} is a custom load planner; async_ckpt plans "
        "loads itself (resharding, key matching and lossless casts are built in). Pass "
        "planner=None, or DefaultLoadPlanner(allow_partial_load=True) / strict=False to load "
        "only the keys the checkpoint has."
    )


def check_save_planner(planner: Any) -> None:
    """Accept None and the default save planners; refuse custom ones."""
    if planner is None or isinstance(planner, DefaultSavePlanner):
        return
    if _is_dcp(planner, "DefaultSavePlanner"):
        return
    raise NotImplementedError(
        f"planner={type(planner).__qualname__} is a custom save planner; async_ckpt plans "
        "saves itself (key validation across ranks, deduplication of replicated chunks, a "
        "cached global plan). Pass planner=None; to change what is saved, change the state dict."
    )


def executor_name(
    executor: Literal["process", "thread"] | None, checkpointer_type: Any
) -> Literal["process", "thread"]:
    """The executor ``async_save`` uses, from our ``executor=`` or DCP's ``async_checkpointer_type=``."""
    if checkpointer_type is None:
        return executor or "process"
    value = (
        checkpointer_type.value if isinstance(checkpointer_type, enum.Enum) else checkpointer_type
    )
    if value not in ("thread", "process"):
        raise ValueError(
            f"async_checkpointer_type={checkpointer_type!r}: expected AsyncCheckpointerType.THREAD "
            "or .PROCESS (or 'thread' / 'process')"
        )
    if executor is not None and executor != value:
        raise ValueError(
            f"executor={executor!r} and async_checkpointer_type={checkpointer_type!r} disagree; "
            "pass one of them"
        )
    return value


# One Stager per DCP stager object, so that repeated async_save calls with the same
# DCP stager reuse one staging buffer (and one worker), as they would with ours.
_STAGERS: weakref.WeakKeyDictionary[Any, Stager] = weakref.WeakKeyDictionary()


def stager_for(async_stager: Any) -> Stager | None:
    """Our Stager for DCP's ``async_stager=`` (DefaultStager / BlockingAsyncStager)."""
    if async_stager is None or isinstance(async_stager, Stager):
        return async_stager
    if not _is_dcp(async_stager, "DefaultStager", "BlockingAsyncStager"):
        raise NotImplementedError(
            f"async_stager={type(async_stager).__qualname__} is a custom stager; async_ckpt "
            "stages into reused shared memory itself. Pass async_ckpt.Stager(StagerOptions(...)) "
            "or None."
        )
    stager = _STAGERS.get(async_stager)
    if stager is None:
        # DefaultStager keeps its StagingOptions in ``_config``; BlockingAsyncStager has none
        config = getattr(async_stager, "_config", None)
        async_staging = bool(getattr(config, "use_async_staging", False))
        pinned = bool(getattr(config, "use_pinned_memory", True))
        # use_shared_memory / use_non_blocking_copy / cache_staged_state_dict: our
        # staging memory is always shared, reused between saves, and copied non-blocking.
        stager = Stager(StagerOptions.from_env(async_staging=async_staging, pin_memory=pinned))
        _STAGERS[async_stager] = stager
    return stager


def check_writer(writer: Any) -> None:
    """A DCP StorageWriter passed by mistake gets a TypeError that says what to pass."""
    _check_storage(writer, StorageWriter, "storage_writer", ("prepare", "write_file", "commit"))


def check_reader(reader: Any) -> None:
    """A DCP StorageReader passed by mistake gets a TypeError that says what to pass."""
    _check_storage(reader, StorageReader, "storage_reader", ("read_metadata", "read_into"))


def _check_storage(obj: Any, expected: type, role: str, methods: tuple[str, ...]) -> None:
    # Ours, or a duck-typed wrapper of ours (tests, instrumentation), passes; DCP's
    # classes (and a writer given as a reader) do not.
    if obj is None or isinstance(obj, expected):
        return
    ours = isinstance(obj, (StorageWriter, StorageReader))
    if not ours and not _from_dcp(obj) and all(hasattr(obj, m) for m in methods):
        return
    example = "FileSystemWriter" if expected is StorageWriter else "FileSystemReader"
    raise TypeError(_wrong_storage(obj, role, example))


def _from_dcp(obj: Any) -> bool:
    return type(obj).__module__.startswith(_DCP)


def _wrong_storage(obj: Any, role: str, example: str) -> str:
    cls = type(obj)
    where = f"{cls.__module__}.{cls.__qualname__}"
    if _from_dcp(obj):
        return (
            f"{role}={where} is torch.distributed.checkpoint's; async_ckpt writes its own format "
            f"through its own storage classes: use async_ckpt.{example}(path) (same arguments), "
            f"or pass checkpoint_id= and let the storage be detected"
        )
    return (
        f"{role} must be an async_ckpt.{'StorageWriter' if 'writer' in role else 'StorageReader'}"
        f", not {where}; use async_ckpt.{example}(path) or pass checkpoint_id="
    )
