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

from ..state.model import LocalState
from .arena import Arena


def item_views(
    arena: Arena, state: LocalState, items: list[int], offsets: list[int]
) -> list[memoryview]:
    """The bytes of ``state.items[i]`` at each offset of ``arena`` (either process's side)."""
    return [
        arena.memoryview(off, state.items[i].nbytes) for i, off in zip(items, offsets, strict=True)
    ]


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

    def descriptor(self) -> dict:
        """What a worker process needs to find this wave's bytes in its mapped arenas."""
        return {
            "index": self.index,
            "items": self.items,
            "buffer": self.buffer,
            "offsets": self.offsets,
        }


class Snapshot:
    """One save's staged state; ``staged`` resolves when every wave is in its buffer."""

    def __init__(
        self,
        state: LocalState,
        arenas: list[Arena],
        waves: list[Wave],
        leases: list[threading.Event],
    ) -> None:
        self.state = state
        self.arenas = arenas
        self.waves = waves
        self.staged: Future = Future()
        self.copied_bytes = 0
        self.to_copy: tuple | None = None  # (source tensors, CUDA stream) until Stager.fill
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

    # ------------------------------------------------------------------ bytes
    def wave_sources(self, wave: Wave) -> list[memoryview]:
        """The staged bytes of each item of ``wave`` (valid once ``wave.staged`` is done)."""
        return item_views(self.arenas[wave.buffer], self.state, wave.items, wave.offsets)

    def sources(self) -> list[memoryview]:
        """The staged bytes of every item, for a snapshot staged in one wave."""
        if len(self.waves) != 1:
            raise ValueError("this snapshot was staged in several waves; use wave_sources()")
        return self.wave_sources(self.waves[0])
