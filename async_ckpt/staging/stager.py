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
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError
from ..planning.items import LocalState, TensorItem
from .arena import Arena, align

_PARALLEL_COPY_BYTES = 16 * 1024 * 1024  # below this, one thread copies faster


@dataclass
class StagerOptions:
    """Tunable staging behaviour; every field has an ``ASYNC_CKPT_<NAME>`` env override."""

    num_buffers: int = 1
    async_staging: bool = False
    copy_threads: int = 0  # 0: the machine's cores, at most 4
    pin_memory: bool = True  # for CUDA states; ignored without CUDA
    # Re-copy only tensors whose storage or ``_version`` changed since this buffer's
    # last stage. In-place writes through ``tensor.data`` do not bump ``_version``
    # and are missed: leave this off if the training loop writes that way.
    skip_unchanged: bool = False
    prefault: bool = True

    @classmethod
    def from_env(cls, **overrides: object) -> StagerOptions:
        opts = cls(**overrides)  # type: ignore[arg-type]
        for name, default in list(vars(opts).items()):
            raw = os.environ.get(f"ASYNC_CKPT_{name.upper()}")
            if raw is not None and name not in overrides:
                value = (
                    raw.lower() in ("1", "true", "yes") if isinstance(default, bool) else int(raw)
                )
                setattr(opts, name, value)
        return opts


@dataclass
class _Layout:
    """Where each item lives in an arena; equal layouts reuse the same arenas."""

    offsets: list[int]
    nbytes: int
    signature: tuple


@dataclass
class Snapshot:
    """A staged state: arena slices for each item, the lease, and the staged future."""

    state: LocalState
    arena: Arena
    buffer_index: int
    offsets: list[int]
    staged: Future = field(default_factory=Future)
    release: threading.Event = field(default_factory=threading.Event)
    copied_bytes: int = 0

    def sources(self) -> list[memoryview]:
        """The staged bytes of each item (valid once ``staged`` is done)."""
        return [
            self.arena.memoryview(off, it.nbytes)
            for off, it in zip(self.offsets, self.state.items, strict=True)
        ]


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def plan_layout(items: list[TensorItem], tensors: list[torch.Tensor]) -> _Layout:
    """Arena offsets for each item; identical views of one storage share a slot."""
    offsets: list[int] = []
    slot_of: dict[tuple, int] = {}
    end = 0
    for item, tensor in zip(items, tensors, strict=True):
        key = _storage_key(tensor)
        if key in slot_of and tensor.numel() > 0:
            offsets.append(slot_of[key])
            continue
        slot_of[key] = end
        offsets.append(end)
        end += align(item.nbytes)
    signature = tuple((it.dtype, it.sizes) for it in items) + tuple(offsets)
    return _Layout(offsets, end, signature)


class Stager:
    """Copies tensors into reused arenas; one Stager serves a sequence of saves."""

    def __init__(self, options: StagerOptions | None = None, **overrides: object) -> None:
        self.options = options or StagerOptions.from_env(**overrides)
        if self.options.num_buffers < 1:
            raise CheckpointError("StagerOptions.num_buffers must be at least 1")
        self._layout: _Layout | None = None
        self._arenas: list[Arena] = []
        self._leases: list[threading.Event] = []
        self._seen: list[dict[int, tuple]] = []  # per buffer: item index -> last copy's mark
        # per buffer: item index -> its typed, shaped arena view; valid for the layout's
        # lifetime (the signature fixes every item's dtype, shape and offset)
        self._views: list[dict[int, torch.Tensor]] = []
        self._next = 0
        self._lock = threading.Lock()
        threads = self.options.copy_threads or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="async_ckpt-stage")
        self._threads = threads
        self._stream = None
        self.arenas_allocated = 0  # tests assert that steady-state saves allocate nothing
        self.generation = 0  # bumps whenever the arenas are re-planned

    # ------------------------------------------------------------------ arenas
    def _ensure_arenas(self, layout: _Layout, cuda: bool) -> None:
        if self._layout is not None and self._layout.signature == layout.signature:
            return
        for lease in self._leases:
            lease.wait()  # old arenas may still be written from
        self._views = []  # they pin the mapping: drop them before closing
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
        self._seen = [{} for _ in self._arenas]
        self._views = [{} for _ in self._arenas]
        self._layout = layout
        self._next = 0
        self.generation += 1

    @property
    def arenas(self) -> list[Arena]:
        """The current arenas (handed to the worker once per generation)."""
        return list(self._arenas)

    # ------------------------------------------------------------------- stage
    def buffer_free(self) -> bool:
        """Whether the next stage would find its buffer free (no wait for a write)."""
        with self._lock:
            return not self._leases or self._leases[self._next].is_set()

    def reserve(self, state: LocalState, tensors: list[torch.Tensor]) -> None:
        """Allocate (and pre-fault) the arenas for this structure now, copying nothing."""
        with self._lock:
            layout = plan_layout(state.items, tensors)
            self._ensure_arenas(layout, any(t.device.type == "cuda" for t in tensors))

    def stage(self, state: LocalState, tensors: list[torch.Tensor]) -> Snapshot:
        """Copy ``tensors`` (aligned with ``state.items``) into a free arena.

        Blocks until a buffer is free (its previous write released it). Returns
        when the copy is done, or at once with ``async_staging``; either way
        ``Snapshot.staged`` resolves when the bytes are in the arena.
        """
        with self._lock:
            layout = plan_layout(state.items, tensors)
            cuda = [t.device for t in tensors if t.device.type == "cuda"][:1]
            self._ensure_arenas(layout, bool(cuda))
            index = self._next
            self._next = (self._next + 1) % len(self._arenas)
            self._leases[index].wait()
            self._leases[index].clear()
        snap = Snapshot(state, self._arenas[index], index, layout.offsets)
        snap.release = self._leases[index]
        jobs = self._copy_jobs(snap, tensors, index)
        snap.copied_bytes = sum(dst.nbytes for dst, _ in jobs)
        # The caller's stream, read on the caller's thread: the copy thread's own
        # current stream is the default one, which may not order the caller's writes.
        compute = torch.cuda.current_stream(cuda[0]) if cuda else None
        if self.options.async_staging:
            threading.Thread(
                target=self._run_copies,
                args=(snap, jobs, compute),
                name="async_ckpt-stage",
                daemon=True,
            ).start()
        else:
            self._run_copies(snap, jobs, compute)
            snap.staged.result()
        return snap

    def _copy_jobs(
        self, snap: Snapshot, tensors: list[torch.Tensor], index: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        seen, views = self._seen[index], self._views[index]
        done_slots: set[int] = set()
        jobs = []
        for n, (item, src, off) in enumerate(
            zip(snap.state.items, tensors, snap.offsets, strict=True)
        ):
            if off in done_slots or item.nbytes == 0:
                continue
            done_slots.add(off)
            if self.options.skip_unchanged:
                # The storage itself (weakly) is part of the mark: a freed tensor's
                # address is soon reused by a new one with the same _version (0), e.g.
                # torch.get_rng_state() or a numpy leaf re-wrapped at every save.
                storage = src.untyped_storage()
                mark = (_storage_key(src), src._version)
                last = seen.get(n)
                if last is not None and last[0] == mark and last[1]() is storage:
                    continue
                seen[n] = (mark, weakref.ref(storage))
            dst = views.get(n)
            if dst is None:  # first stage of this layout; later stages reuse the view
                dst = views[n] = snap.arena.view(off, item.nbytes).view(src.dtype).view(src.shape)
            jobs.append((dst, src))
        return jobs

    def _run_copies(
        self, snap: Snapshot, jobs: list[tuple[torch.Tensor, torch.Tensor]], compute: object
    ) -> None:
        try:
            cuda_jobs = [(d, s) for d, s in jobs if s.device.type == "cuda"]
            cpu_jobs = [(d, s) for d, s in jobs if s.device.type != "cuda"]
            event = self._copy_cuda(cuda_jobs, compute) if cuda_jobs else None
            self._copy_cpu(cpu_jobs)
            if event is not None:
                event.synchronize()  # "staged" only after the D2H copies completed
            snap.staged.set_result(None)
        except BaseException as exc:  # the save fails; the lease goes back
            self._seen[snap.buffer_index].clear()  # the buffer's contents are unknown now
            snap.release.set()
            snap.staged.set_exception(exc)

    def _copy_cuda(self, jobs: list[tuple[torch.Tensor, torch.Tensor]], compute: object):
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

    def _copy_cpu(self, jobs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        total = sum(d.nbytes for d, _ in jobs)
        if self._threads == 1 or total < _PARALLEL_COPY_BYTES:
            for dst, src in jobs:
                dst.copy_(src)
            return
        # Balance bytes over threads; split the biggest tensors along dim 0 so
        # one huge matrix does not leave the other threads idle.
        share = -(-total // self._threads)
        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
        for dst, src in jobs:
            if dst.nbytes > share and src.dim() > 0 and src.shape[0] > 1:
                for d, s in zip(dst.chunk(self._threads), src.chunk(self._threads), strict=True):
                    pieces.append((d, s))
            else:
                pieces.append((dst, src))
        bins: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(self._threads)]
        load = [0] * self._threads
        for dst, src in sorted(pieces, key=lambda p: -p[0].nbytes):
            j = load.index(min(load))
            bins[j].append((dst, src))
            load[j] += dst.nbytes

        def run(b: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            for dst, src in b:
                dst.copy_(src)

        for f in [self._pool.submit(run, b) for b in bins if b]:
            f.result()

    def close(self) -> None:
        """Free the arenas once no write uses them."""
        with self._lock:
            for lease in self._leases:
                lease.wait(timeout=60)
            self._views = []
            for arena in self._arenas:
                arena.close()
            self._arenas, self._leases, self._layout = [], [], None
            self._pool.shutdown(wait=True)
