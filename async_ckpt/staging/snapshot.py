"""A staged state: its waves, the arenas they sit in, and the buffer leases they hold.

A *wave* is a group of items copied into one arena buffer together and
written together. Most saves are one wave; under a memory budget a state is
several waves that reuse the buffers in turn. A wave holds its buffer's lease
from before its copy until the executor reports it written
(:meth:`Snapshot.release_wave`), so a pending write is never overwritten.
"""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from ..state.model import LocalState
from .arena import Arena

if TYPE_CHECKING:
    import torch


def item_views(
    arena: Arena, state: LocalState, items: list[int], offsets: list[int]
) -> list[memoryview]:
    """The bytes of ``state.items[i]`` at each offset of ``arena`` (either process's side)."""
    return [
        arena.memoryview(off, state.items[i].nbytes) for i, off in zip(items, offsets, strict=True)
    ]


@dataclass(frozen=True)
class WavePlace:
    """Where wave ``index``'s bytes sit: ``items`` (indices into the state's items) at
    ``offsets`` of arena ``buffer``. Picklable: the worker process finds them with it."""

    index: int
    items: list[int]
    buffer: int
    offsets: list[int]


class PendingCopy(NamedTuple):
    """What :meth:`Stager.fill` still has to copy in: the source tensors (aligned with
    the state's items) and the caller's CUDA stream, read on the caller's thread."""

    tensors: list[torch.Tensor]
    stream: Any  # torch.cuda.Stream, or None without CUDA tensors


@dataclass
class Wave:
    """Items ``items`` (indices into the state's items) at ``offsets`` of buffer ``buffer``.

    ``fresh``: this wave takes its buffer (waits for the lease) rather than
    continuing the wave before it in the same buffer; ``last``: writing it
    ends this snapshot's use of the buffer, so its lease goes back.
    """

    index: int
    items: list[int]
    buffer: int
    offsets: list[int]
    fresh: bool = True
    last: bool = True
    staged: Future = field(default_factory=Future)

    @property
    def place(self) -> WavePlace:
        """Where this wave's bytes sit, for whoever writes them (maybe another process)."""
        return WavePlace(self.index, self.items, self.buffer, self.offsets)


class Snapshot:
    """One save's staged state; ``staged`` resolves when every wave is in its buffer.

    ``arenas`` are the stager's arenas of generation ``arena_generation`` (a new
    generation whenever the stager re-plans them).
    """

    def __init__(
        self,
        state: LocalState,
        arenas: list[Arena],
        arena_generation: int,
        waves: list[Wave],
        leases: list[threading.Event],
    ) -> None:
        self.state = state
        self.arenas = arenas
        self.arena_generation = arena_generation
        self.waves = waves
        self.staged: Future = Future()
        self.copied_bytes = 0
        self.staging_memory: str | None = None  # "pinned" / "pageable" for CUDA states
        self.to_copy: PendingCopy | None = None  # set by Stager.begin, taken by Stager.fill
        self._leases = leases
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self.abandoned = threading.Event()  # the save ended early: stop staging its waves
        self.stopped = threading.Event()  # a write failed: stage no further wave

    # ------------------------------------------------------------------ leases
    def acquire(self, buffer: int) -> None:
        """Wait until ``buffer`` is free, then hold it; raises once the save has ended."""
        lease = self._leases[buffer]
        while True:
            lease.wait()
            with self._lock:
                if self.abandoned.is_set():
                    raise CancelledError("the save ended before all of its waves were staged")
                if lease.is_set():
                    lease.clear()
                    self._held.add(buffer)
                    return

    def release_wave(self, index: int) -> None:
        """Wave ``index`` is written: its buffer may take the next wave or save."""
        if self.waves[index].last:
            self.release_buffer(self.waves[index].buffer)

    def release_buffer(self, buffer: int) -> None:
        """Give ``buffer`` back if this snapshot holds it."""
        with self._lock:
            if buffer in self._held:
                self._held.discard(buffer)
                self._leases[buffer].set()

    def wave_written(self, index: int, ok: bool) -> None:
        """The executor is done with wave ``index``; not ``ok``: its write failed, so
        later waves need not be copied (stopped before the release wakes the stager)."""
        if not ok:
            self.stopped.set()
        self.release_wave(index)

    def release(self) -> None:
        """The save is over (done, failed or stopped): give back every buffer still held."""
        with self._lock:
            self.abandoned.set()
            held, self._held = self._held, set()
            for buffer in held:
                self._leases[buffer].set()
