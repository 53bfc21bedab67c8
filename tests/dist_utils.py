"""Run a function on several gloo ranks: the repository's one launcher, ``benchmarks/ranks.py``.

Ranks are forks of a forkserver that has imported torch, DTensor, async_ckpt
and pytest once per test session (see ``benchmarks.ranks``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:  # benchmarks/ is not installed; a bare `pytest` leaves it off the path
    sys.path.insert(0, REPO)

from benchmarks import ranks  # noqa: E402

# Test modules import pytest: the forkserver loads it once for every rank.
_PRELOAD = (*ranks.PRELOAD, "pytest")


def run_ranks(
    fn: Callable, world_size: int, *args: Any, timeout: float = 240, reporting: int | None = None
) -> list[Any]:
    """``fn(rank, world_size, *args)`` on each rank; see :func:`benchmarks.ranks.run_ranks`."""
    return ranks.run_ranks(
        fn, world_size, *args, timeout=timeout, reporting=reporting, preload=_PRELOAD
    )
