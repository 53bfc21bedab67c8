"""The stager: snapshot a state's tensors into reused staging arenas.

This is the only part of a checkpoint that blocks training, so it copies at
memory speed: arenas are allocated once per state structure and reused, large
copies are spread over threads (``Tensor.copy_`` releases the GIL), CUDA
tensors go device-to-host on a side stream into page-locked memory, and
tensors sharing storage are copied once.

What the caller may touch, and when:

* synchronous staging (default): ``stage`` returns after the copy; the caller
  may mutate its tensors immediately.
* ``async_staging=True``: ``stage`` returns at once; the caller must wait for
  ``Snapshot.staged`` (``fut.staged.result()`` / ``await fut.staged``) before
  mutating any tensor of the state. Reading them, and running forward passes
  that do not write them, is fine meanwhile.

A buffer is leased to a snapshot until its write is done; a new stage waits
for a free buffer (``num_buffers=2`` lets one save stage while the previous
one still writes), so a pending write is never overwritten.

Under a memory budget (``max_staging_bytes``) a state bigger than one buffer
is staged in waves that take turns in the buffers: each wave waits until the
write of the wave before it in the same buffer is done. The stall then grows
from the copy time to roughly the time to write all but the last
``num_buffers`` waves; see docs/concepts.md.
"""

from __future__ import annotations

import copy
import logging
import operator
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, SaveFailedError
from ..gc_pause import gc_paused
from ..state.model import LocalState, TensorItem
from ..threads import Workers, usable_cores
from .arena import ALIGNMENT, Arena
from .buffer_copies import BufferCopies
from .copies import Ahead, copy_cpu, first_cuda, split_by_device
from .layout import (
    Layout,
    buffer_capacity,
    in_parts,
    plan_layout,
    split_to_fit,
    storage_key,
    tied_items,
)
from .options import InvalidOptionError, StagerOptions
from .snapshot import PendingCopy, Snapshot, Wave

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .options import StagerOverrides


log = logging.getLogger("async_ckpt")

# What the staging thread runs: a snapshot's copy, or work handed over whole.
_StageWork = tuple[Snapshot, PendingCopy, Any] | Callable[[], None]


class Stager:
    """Copies tensors into reused arenas; one Stager serves a sequence of saves."""

    def __init__(
        self, options: StagerOptions | None = None, **overrides: Unpack[StagerOverrides]
    ) -> None:
        """``Stager(max_staging_bytes="1GiB", num_buffers=2)``, or ``Stager(StagerOptions(...))``.

        Keyword options not given come from ``ASYNC_CKPT_<NAME>`` environment
        variables, then the defaults; with ``options``, keywords replace its
        fields (and the environment is not read). Bad values raise
        :class:`~async_ckpt.staging.options.InvalidOptionError` here.
        """
        if options is None:
            options = StagerOptions.from_env(**overrides)
        elif not isinstance(options, StagerOptions):
            raise InvalidOptionError(
                f"Stager(options=...) takes a StagerOptions, not {type(options).__name__}; "
                "or pass the options as keywords: Stager(max_staging_bytes='1GiB', num_buffers=2)"
            )
        elif overrides:  # the given options with these fields replaced (each one checked)
            options = copy.copy(options)
            for name, value in overrides.items():
                setattr(options, name, value)
        self.options = options
        if self.options.num_buffers < 1:
            raise CheckpointError("StagerOptions.num_buffers must be at least 1")
        budget, buffers = self.options.max_staging_bytes, self.options.num_buffers
        if budget and budget < ALIGNMENT * buffers:  # buffer_capacity would refuse it at save
            raise InvalidOptionError(
                f"StagerOptions.max_staging_bytes={budget} is too small for {buffers} staging "
                f"buffer(s): use at least {ALIGNMENT * buffers} bytes, or 0 for no cap"
            )
        self._layout: Layout | None = None
        self._staging: Future[None] | None = None  # the latest snapshot's staged future
        # async staging's work: (snapshot, its pending copy), None to stop
        self._stage_queue: queue.SimpleQueue[_StageWork | None] = queue.SimpleQueue()
        self._stage_thread: threading.Thread | None = None
        self._last_layout: _LastLayout | None = None
        self._arenas: list[Arena] = []
        self._leases: list[threading.Event] = []
        # per buffer: its views, copy plans and last copies; valid for the layout's
        # lifetime (the signature fixes every item's dtype, shape and offset)
        self._buffers: list[BufferCopies] = []
        self._next = 0
        self._lock = threading.Lock()
        threads = self.options.copy_threads or min(4, usable_cores())
        self._pool = Workers(threads, "async_ckpt-stage")  # works at interpreter exit too
        self._threads = threads
        self._stream: torch.cuda.Stream | None = None
        self._warned_pageable = False
        self.arenas_allocated = 0  # tests assert that steady-state saves allocate nothing
        self.generation = 0  # bumps whenever the arenas are re-planned

    # ------------------------------------------------------------------ arenas
    def _ensure_arenas(self, layout: Layout, cuda: bool) -> None:
        if self._layout is not None and (
            self._layout is layout or self._layout.signature == layout.signature
        ):
            return
        for lease in self._leases:
            lease.wait()  # old arenas may still be written from
        self._buffers = []  # their views pin the mapping: drop them before closing
        for arena in self._arenas:
            arena.close()
        self._arenas, self._layout = [], None  # a failed allocation below re-plans next time
        for _ in range(self.options.num_buffers):
            arena = Arena(layout.nbytes, pin=cuda and self.options.pin_memory)
            if self.options.prefault:
                arena.prefault()
            self._arenas.append(arena)
            self.arenas_allocated += 1
        self._leases = [threading.Event() for _ in self._arenas]
        for lease in self._leases:
            lease.set()
        self._buffers = [BufferCopies() for _ in self._arenas]
        self._layout = layout
        self._next = 0
        self.generation += 1

    def _staging_memory(self) -> str:
        """What the arenas of a CUDA state are: page-locked or not (said once if not)."""
        if all(a.pinned for a in self._arenas):
            return "pinned"
        if self.options.pin_memory and not self._warned_pageable:
            self._warned_pageable = True
            log.warning(
                "the staging memory could not be page-locked (cudaHostRegister failed): "
                "device-to-host copies of this state run at pageable speed"
            )
        return "pageable"

    @property
    def arenas(self) -> list[Arena]:
        """The current arenas (of generation :attr:`generation`)."""
        return list(self._arenas)

    # ------------------------------------------------------------------- stage
    def buffer_free(self) -> bool:
        """Whether the next stage would find its buffer free (no wait for a write)."""
        with self._lock:
            if self._staging is not None and not self._staging.done():
                return False  # the next stage waits for this one's waves (and their writes)
            return not self._leases or self._leases[self._next].is_set()

    def _fit(
        self, state: LocalState, tensors: list[torch.Tensor]
    ) -> tuple[LocalState, list[torch.Tensor], Layout]:
        """The state (big tensors cut to the budget) and its layout in the arenas."""
        budget = self.options.max_staging_bytes
        if not budget:
            layout = self._cached_layout(state, tensors)
            if self.options.wave_bytes:
                layout = in_parts(layout, state.items, self.options.wave_bytes)
            return state, tensors, layout
        capacity = buffer_capacity(budget, self.options.num_buffers)
        state, tensors = split_to_fit(state, tensors, capacity)
        return state, tensors, plan_layout(state.items, tensors, capacity)

    def _cached_layout(self, state: LocalState, tensors: list[torch.Tensor]) -> Layout:
        """The previous layout while the items (same objects) and the ties are unchanged.

        A slot depends on a tensor's memory only through ties (identical views of
        one storage share a slot): a tensor that moved (``.data`` swapped) is
        copied from where it is now into the same slot. So only tied tensors are
        checked; a tie that broke takes a new layout, a new one only misses the
        sharing. At 100k untied tensors this is one C-level pass over the items
        instead of reading every tensor's pointer and strides (75 ms).
        """
        last = self._last_layout
        if (
            last is not None
            and len(last.items) == len(state.items)
            and all(map(operator.is_, last.items, state.items))  # in C: 100k items
            and [storage_key(tensors[n]) for n in last.tied] == last.tied_views
        ):
            return last.layout
        layout = plan_layout(state.items, tensors)
        tied = tied_items(layout, state.items)
        # the items are kept alive by the entry, so their ids cannot be reused meanwhile
        views = [storage_key(tensors[n]) for n in tied]
        self._last_layout = _LastLayout(list(state.items), tied, views, layout)
        return layout

    def reserve(self, state: LocalState, tensors: list[torch.Tensor]) -> None:
        """Allocate (and pre-fault) the arenas for this structure now, copying nothing."""
        with self._lock:
            state, tensors, layout = self._fit(state, tensors)
            self._ensure_arenas(layout, first_cuda(tensors) is not None)

    def stage(self, state: LocalState, tensors: list[torch.Tensor]) -> Snapshot:
        """Copy ``tensors`` (aligned with ``state.items``) into free arenas: ``begin`` + ``fill``.

        A state staged in several waves (memory budget) needs its consumer
        started between the two, since later waves wait for earlier ones to be
        written: use ``begin``, hand the snapshot to the writer, then ``fill``.
        """
        snap = self.begin(state, tensors)
        if sum(w.fresh for w in snap.waves) > len(snap.arenas):
            snap.release()
            error = CheckpointError(
                f"this state needs {len(snap.waves)} waves under max_staging_bytes, more than "
                f"the {len(snap.arenas)} buffer(s): stage() would wait for writes nobody does. "
                "Save through AsyncCheckpointer, or use begin() and fill() with a writer that "
                "calls release_wave() as waves are written."
            )
            snap.staged.set_exception(error)  # the next stage need not wait for this one
            raise error
        self.fill(snap)
        snap.staged.result()  # raises what the copy raised
        return snap

    def begin(self, state: LocalState, tensors: list[torch.Tensor]) -> Snapshot:
        """Lay out the state in the arenas and hold the first buffer; copies nothing.

        Blocks until that buffer is free (its previous write released it).
        """
        with self._lock:
            previous = self._staging
            if previous is not None:
                try:
                    previous.result()  # one snapshot stages at a time: waves take buffers in order
                except BaseException:
                    pass
            state, tensors, layout = self._fit(state, tensors)
            a_cuda_tensor = first_cuda(tensors)
            cuda = [a_cuda_tensor.device] if a_cuda_tensor is not None else []
            self._ensure_arenas(layout, bool(cuda))
            count = len(self._arenas)
            first = self._next
            if layout.shared_arena:  # parts of one arena, written while the rest is copied
                last = len(layout.waves) - 1
                waves = [
                    Wave(k, items, first, offsets, fresh=k == 0, last=k == last)
                    for k, (items, offsets) in enumerate(layout.waves)
                ]
                self._next = (first + 1) % count
            else:  # each wave takes its turn in the buffers
                waves = [
                    Wave(k, items, (first + k) % count, offsets)
                    for k, (items, offsets) in enumerate(layout.waves)
                ]
                self._next = (first + len(waves)) % count
            if not layout.shared_arena and len(waves) > 1:
                # buffers change hands within the save: nothing stays staged
                for buffer in self._buffers:
                    buffer.seen.clear()
            snap = Snapshot(state, list(self._arenas), self.generation, waves, self._leases)
            if cuda:
                snap.staging_memory = self._staging_memory()
            snap.acquire(waves[0].buffer)
            self._staging = snap.staged
        # The caller's stream, read on the caller's thread: the copy thread's own
        # current stream is the default one, which may not order the caller's writes.
        compute = torch.cuda.current_stream(cuda[0]) if cuda else None
        snap.to_copy = PendingCopy(tensors, compute)
        return snap

    def fill(self, snap: Snapshot, *, here: bool = False) -> Snapshot:
        """Copy the snapshot's tensors in, wave by wave.

        Returns when the copy is done, or at once with ``async_staging`` (unless
        ``here``: the staging thread's own work copies in place); either way
        ``snap.staged`` resolves when every byte is in an arena, or with the
        copy's error (``fill`` itself does not raise it). Under a memory budget
        each wave waits for a buffer that an earlier wave's write frees, so the
        copy takes longer (back-pressure).
        """
        pending, snap.to_copy = snap.to_copy, None
        if pending is None:
            raise CheckpointError("this snapshot was filled already")
        if self.options.async_staging and not here:
            self._submit((snap, pending, self._queue_first_cuda_copies(snap, pending)))
        else:
            self._stage_waves(snap, pending)  # errors land in snap.staged
        return snap

    def in_staging_thread(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the staging thread, after the stages queued before it; it
        must not raise (it reports its own errors)."""
        self._submit(work)

    def _submit(self, work: _StageWork) -> None:
        # A standing thread: starting one per save made the caller wait for it
        # to be scheduled, milliseconds on a busy machine.
        if self._stage_thread is None:
            self._stage_thread = threading.Thread(
                target=self._stage_loop, name="async_ckpt-stage", daemon=True
            )
            self._stage_thread.start()
        self._stage_queue.put(work)

    def _stage_loop(self) -> None:
        while (work := self._stage_queue.get()) is not None:
            if callable(work):
                work()
            else:
                self._stage_waves(*work)
            del work  # do not hold the caller's tensors until the next save

    def _queue_first_cuda_copies(self, snap: Snapshot, pending: PendingCopy) -> Ahead | None:
        """With async staging, queue the first wave's device-to-host copies here, on the
        caller's thread, and make the caller's stream wait for them on the GPU (no CPU
        block): kernels the caller queues after ``save()`` returns (an optimizer step)
        then run after the copy has read the tensors, ``staged`` awaited or not. Later
        waves (a memory budget) need buffers that writes free: they are copied on the
        staging thread, so for them ``staged`` must be awaited before a change."""
        if pending.stream is None:  # no CUDA tensor: nothing to order
            return None
        done_slots: set[int] = set()
        try:
            with torch.no_grad():
                jobs, nbytes = self._copy_jobs(snap, snap.waves[0], pending.tensors, done_slots)
                cuda_jobs, cpu_jobs = split_by_device(jobs)
                event = self._copy_cuda(cuda_jobs, pending.stream) if cuda_jobs else None
            if event is not None:
                pending.stream.wait_event(event)
        except Exception:  # the staging thread copies the wave instead, and reports errors
            return None
        return Ahead(cpu_jobs, event, nbytes, done_slots)

    def _stage_waves(
        self, snap: Snapshot, pending: PendingCopy, ahead: Ahead | None = None
    ) -> None:
        with gc_paused(), torch.no_grad():
            self._stage_waves_paused(snap, pending, ahead)

    def _stage_waves_paused(
        self, snap: Snapshot, pending: PendingCopy, ahead: Ahead | None
    ) -> None:
        wave = snap.waves[0]
        done_slots: set[int] = set()  # arena slots filled since this buffer was taken
        try:
            for wave in snap.waves:
                if wave.fresh and wave.index > 0:
                    snap.acquire(wave.buffer)  # waits for an earlier wave's write
                if snap.stopped.is_set():
                    raise SaveFailedError("staging stopped: a write of this save failed")
                if wave.fresh:
                    done_slots = set()
                if wave.index == 0 and ahead is not None:  # its CUDA copies are queued already
                    done_slots = ahead.done_slots
                    snap.copied_bytes += ahead.nbytes
                    self._copy_cpu(ahead.cpu_jobs, sum(d.nbytes for d, _ in ahead.cpu_jobs))
                    if ahead.event is not None:
                        ahead.event.synchronize()  # "staged" once the D2H copies completed
                else:
                    jobs, nbytes = self._copy_jobs(snap, wave, pending.tensors, done_slots)
                    snap.copied_bytes += nbytes
                    self._run_copies(jobs, nbytes, pending.stream)
                wave.staged.set_result(None)
        except BaseException as exc:  # the save fails
            if wave.buffer < len(self._buffers):  # else closed meanwhile: nothing to forget
                self._buffers[wave.buffer].seen.clear()  # the buffer's contents are unknown now
            if wave.fresh:  # nothing else of this save is in the buffer: it goes back now
                snap.release_buffer(wave.buffer)
            for rest in snap.waves[wave.index :]:
                rest.staged.set_exception(exc)
            snap.staged.set_exception(exc)
            return
        snap.staged.set_result(None)

    def _copy_jobs(
        self, snap: Snapshot, wave: Wave, tensors: list[torch.Tensor], done_slots: set[int]
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        # Unchanged tensors are skipped only while the buffers stay with their items:
        # not when waves take turns in them.
        skip = self.options.skip_unchanged and not any(w.fresh for w in snap.waves[1:])
        return self._buffers[wave.buffer].jobs(snap, wave, tensors, done_slots, skip)

    def _run_copies(
        self,
        jobs: list[tuple[torch.Tensor, torch.Tensor]],
        nbytes: int,
        compute: torch.cuda.Stream | None,
    ) -> None:
        if compute is None:  # no CUDA tensor in this state (begin read the stream only then)
            self._copy_cpu(jobs, nbytes)
            return
        cuda_jobs, cpu_jobs = split_by_device(jobs)
        event = self._copy_cuda(cuda_jobs, compute) if cuda_jobs else None
        self._copy_cpu(cpu_jobs, sum(d.nbytes for d, _ in cpu_jobs))
        if event is not None:
            event.synchronize()  # "staged" only after the D2H copies completed

    def _copy_cuda(
        self, jobs: list[tuple[torch.Tensor, torch.Tensor]], compute: torch.cuda.Stream | None
    ) -> torch.cuda.Event:
        device = jobs[0][1].device
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        self._stream.wait_stream(compute or torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            for dst, src in jobs:
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    def _copy_cpu(self, jobs: list[tuple[torch.Tensor, torch.Tensor]], total: int) -> None:
        copy_cpu(jobs, total, self._threads, self._pool)

    def close(self) -> None:
        """Free the arenas once no write uses them."""
        if self._stage_thread is not None:
            self._stage_queue.put(None)
            self._stage_thread.join(timeout=60)
            self._stage_thread = None
        with self._lock:
            for lease in self._leases:
                lease.wait(timeout=60)
            self._buffers = []
            for arena in self._arenas:
                arena.close()
            self._arenas, self._leases, self._layout = [], [], None
            self._pool.shutdown()


@dataclass(frozen=True)
class _LastLayout:
    """The last stage's layout, its items, and its tied items' views (``storage_key``)."""

    items: list[TensorItem]
    tied: list[int]
    tied_views: list[tuple]
    layout: Layout
