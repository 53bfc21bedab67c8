"""Executors by name: the table ``AsyncCheckpointer(executor=...)`` chooses from."""

from __future__ import annotations

from ..errors import CheckpointError
from .base import Executor
from .process import ProcessExecutor
from .thread import ThreadExecutor

EXECUTORS: dict[str, type[Executor]] = {
    "process": ProcessExecutor,
    "thread": ThreadExecutor,
}


def executor_class(name: str) -> type[Executor]:
    """The executor registered as ``name``; CheckpointError naming the choices otherwise."""
    try:
        return EXECUTORS[name]
    except (KeyError, TypeError):
        choices = " or ".join(repr(n) for n in EXECUTORS)
        raise CheckpointError(f"executor must be {choices}, not {name!r}") from None
