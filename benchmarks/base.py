"""The contract every benchmarked method implements.

The runner owns the clock: it times how long `save` takes to return (stall),
how long until `Pending.wait_staged` returns (the moment training may mutate
the state again) and until `Pending.wait_committed` returns (bytes durable).
Methods only start work and expose those two waits.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.state import empty_like_state


@dataclass
class BenchContext:
    """Per-size shared resources handed to every method's setup()."""

    root: Path  # scratch directory for this size; methods write under it
    state: dict[str, Any]  # live state, mutated in place between saves
    nbytes: int  # tensor bytes in state
    _template: dict[str, Any] | None = field(default=None, repr=False)

    def template(self) -> dict[str, Any]:
        """Lazily built load target shared by all in-place loaders (saves RAM)."""
        if self._template is None:
            self._template = empty_like_state(self.state)
        return self._template


class Pending(ABC):
    """Handle for one in-flight save."""

    def wait_staged(self) -> None:  # noqa: B027 - optional, no-op by default
        """Block until the caller may mutate the state again."""

    @abstractmethod
    def wait_committed(self) -> None:
        """Block until the checkpoint is durable (or the method's end point)."""


class Done(Pending):
    """Handle for synchronous methods: everything happened inside save()."""

    def wait_committed(self) -> None:
        return None


class FuturePending(Pending):
    """Handle over futures (DCP's AsyncSaveResponse, our own executors)."""

    def __init__(self, committed: Future, staged: Future | None = None) -> None:
        self._committed = committed
        self._staged = staged

    def wait_staged(self) -> None:
        if self._staged is not None:
            self._staged.result()

    def wait_committed(self) -> None:
        self._committed.result()


class Method(ABC):
    """A checkpointing strategy under test. Subclass, then register in methods.py."""

    name: str = ""  # filled in from the registry key
    is_async: bool = False  # True: training may resume before the commit
    durable: bool = True  # False for in-memory limits (no disk commit)
    can_load: bool = False  # True: load() is implemented and timed
    needs_process_group: bool = False  # True: runner inits a 1-rank gloo group
    # Which methods the runner keeps when RAM is short: lower first (limits 0,
    # async_ckpt 1, peers 2). See resident_factor/transient_factor.
    priority: int = 1
    # True: setup() may run in a thread beside other such setups (e.g. it waits
    # for a worker process to start); saves a lot of time in short runs.
    parallel_setup: bool = False

    def resident_factor(self) -> float:
        """Memory held from setup to teardown, in multiples of the state's tensor bytes."""
        return 0.0

    def transient_factor(self) -> float:
        """Extra memory held during one save or load (fresh copies), same unit."""
        return 0.0

    def setup(self, ctx: BenchContext) -> None:  # noqa: B027 - optional hook
        """One-time preparation outside the timed region (buffers, pools, PG)."""

    @abstractmethod
    def save(self, state: dict[str, Any], path: Path) -> Pending:
        """Start saving `state` to `path`; return as early as the method allows."""

    def load(self, ctx: BenchContext, path: Path) -> Any:
        """Load the checkpoint at `path` and return the loaded state."""
        raise NotImplementedError

    def expected(self, state: dict[str, Any]) -> Any:
        """What load() should return for `state`; the runner compares the two."""
        return state

    def info(self) -> dict[str, Any]:
        """Configuration/one-off figures worth keeping in the JSON report."""
        return {}

    def run_info(self) -> dict[str, Any]:
        """Extra numeric figures of the save that just committed (kept per run)."""
        return {}

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release everything setup() created."""


def remove_path(path: Path) -> None:
    """Delete a checkpoint file or directory, ignoring absence."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
