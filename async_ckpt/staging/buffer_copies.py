"""Which copies a stage makes into one staging buffer.

Each buffer keeps, for as long as its layout lasts, the typed view of every
item's slot, each wave's copy plan (the items it copies and their views),
and with ``skip_unchanged`` the mark of each item's last copy into it, so a
steady loop of 100k tensors plans nothing again.
"""

from __future__ import annotations

import weakref

import torch

from .copies import CopyPlan, Job
from .layout import storage_key
from .snapshot import Snapshot, Wave
from .views import typed_views


class BufferCopies:
    """The copy planning of one staging buffer (one arena)."""

    def __init__(self) -> None:
        self.views: dict[int, torch.Tensor] = {}  # item index -> its slot's view
        self.plans: dict[int, CopyPlan] = {}  # wave index -> its copy plan
        # item index -> (mark, its storage) of the last copy into this buffer
        self.seen: dict[int, tuple[object, weakref.ref[torch.UntypedStorage]]] = {}

    def jobs(
        self,
        snap: Snapshot,
        wave: Wave,
        tensors: list[torch.Tensor],
        done_slots: set[int],
        skip_unchanged: bool,
    ) -> tuple[list[Job], int]:
        """Copies for the wave's items, skipping slots already filled in this buffer
        (``done_slots``, updated); and their bytes. ``skip_unchanged``: only the items
        whose tensors changed since this buffer's last copy."""
        if skip_unchanged:
            jobs = self._changed_jobs(snap, wave, tensors, done_slots)
            return jobs, sum(dst.nbytes for dst, _ in jobs)
        plan = self._copy_plan(snap, wave, tensors, done_slots)
        sources = map(tensors.__getitem__, plan.indices)
        return list(zip(plan.dsts, sources, strict=True)), plan.nbytes

    def _copy_plan(
        self, snap: Snapshot, wave: Wave, tensors: list[torch.Tensor], done_slots: set[int]
    ) -> CopyPlan:
        """Fixed while the wave's layout is the same object: reused, not rebuilt."""
        plan = self.plans.get(wave.index)
        if plan is not None and plan.items is wave.items:
            done_slots |= plan.slots
            return plan
        items = snap.state.items
        plan = CopyPlan(wave.items)
        for n, off in zip(wave.items, wave.offsets, strict=True):
            nbytes = items[n].nbytes
            if off in done_slots or nbytes == 0:
                continue
            done_slots.add(off)
            plan.slots.add(off)
            plan.indices.append(n)
            plan.nbytes += nbytes
        self._add_views(snap, wave, plan.indices, tensors)
        plan.dsts = [self.views[n] for n in plan.indices]
        self.plans[wave.index] = plan
        return plan

    def _changed_jobs(
        self, snap: Snapshot, wave: Wave, tensors: list[torch.Tensor], done_slots: set[int]
    ) -> list[Job]:
        items = snap.state.items
        changed = []
        for n, off in zip(wave.items, wave.offsets, strict=True):
            src = tensors[n]
            if off in done_slots or items[n].nbytes == 0:
                continue
            done_slots.add(off)
            # The storage itself (weakly) is part of the mark: a freed tensor's
            # address is soon reused by a new one with the same _version (0), e.g.
            # torch.get_rng_state() or a numpy leaf re-wrapped at every save.
            storage = src.untyped_storage()
            mark = (storage_key(src), src._version)
            last = self.seen.get(n)
            if last is not None and last[0] == mark and last[1]() is storage:
                continue
            self.seen[n] = (mark, weakref.ref(storage))
            changed.append(n)
        self._add_views(snap, wave, changed, tensors)
        return [(self.views[n], tensors[n]) for n in changed]

    def _add_views(
        self, snap: Snapshot, wave: Wave, indices: list[int], tensors: list[torch.Tensor]
    ) -> None:
        """The slots of ``indices`` (items of ``wave``) that have no view yet get one,
        all made together; reused by later stages of the same layout."""
        new = [n for n in indices if n not in self.views]
        if not new:
            return
        items = snap.state.items
        offsets = dict(zip(wave.items, wave.offsets, strict=True))
        slots = [(offsets[n], items[n].nbytes) for n in new]
        made = typed_views(snap.arenas[wave.buffer].bytes, slots, [tensors[n] for n in new])
        self.views.update(zip(new, made, strict=True))
