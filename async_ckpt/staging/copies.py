"""The staging copies themselves: batched CPU copies, spread over threads, and the
records the stager keeps of them (copy plans, the first wave queued ahead)."""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..threads import Workers, wait_all

PARALLEL_COPY_BYTES = 16 * 1024 * 1024  # below this, one thread copies faster
Job = tuple[torch.Tensor, torch.Tensor]  # (arena view, source tensor)

_is_cuda = operator.attrgetter("is_cuda")


def first_cuda(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The first CUDA tensor, without a Python-level loop over the (many) CPU ones."""
    return next(itertools.compress(tensors, map(_is_cuda, tensors)), None)


def split_by_device(jobs: list[Job]) -> tuple[list[Job], list[Job]]:
    """The jobs whose source is on a CUDA device, and the others."""
    cuda = [(d, s) for d, s in jobs if s.device.type == "cuda"]
    return cuda, [(d, s) for d, s in jobs if s.device.type != "cuda"]


# One call copies a whole list (torch >= 2.1); a Python loop of copy_ costs
# about 3 us per tensor, which dominates a state of 100k small tensors.
_foreach_copy = getattr(torch, "_foreach_copy_", None)


_dst, _src = operator.itemgetter(0), operator.itemgetter(1)


def copy_all(jobs: list[Job]) -> None:
    if _foreach_copy is not None and len(jobs) > 1:
        # two C-level passes: zip(*jobs) took 5x as long at 100k jobs
        _foreach_copy(list(map(_dst, jobs)), list(map(_src, jobs)))
        return
    for dst, src in jobs:
        dst.copy_(src)


@dataclass
class Ahead:
    """The first wave's copies, its CUDA part queued on the caller's thread (and the
    event that marks it done); the CPU part is left to the staging thread."""

    cpu_jobs: list[Job]
    event: Any  # torch.cuda.Event, None when the wave had no CUDA tensor
    nbytes: int
    done_slots: set[int]


@dataclass(eq=False)
class CopyPlan:
    """A wave's copies: the item indices to copy, their arena views, their bytes, and
    the arena slots they fill. ``items`` is the layout's list it was made for."""

    items: list[int]
    indices: list[int] = field(default_factory=list)
    dsts: list[torch.Tensor] = field(default_factory=list)
    slots: set[int] = field(default_factory=set)
    nbytes: int = 0


def copy_cpu(jobs: list[Job], total: int, threads: int, pool: Workers) -> None:
    """Copy ``jobs`` (``total`` bytes) on up to ``threads`` threads of ``pool``."""
    if threads == 1 or total < PARALLEL_COPY_BYTES:
        copy_all(jobs)
        return
    # Balance bytes over threads; split the biggest tensors along dim 0 so
    # one huge matrix does not leave the other threads idle.
    share = -(-total // threads)
    pieces: list[Job] = []
    for dst, src in jobs:
        if dst.nbytes > share and src.dim() > 0 and src.shape[0] > 1:
            for d, s in zip(dst.chunk(threads), src.chunk(threads), strict=True):
                pieces.append((d, s))
        else:
            pieces.append((dst, src))
    bins: list[list[Job]] = [[] for _ in range(threads)]
    load = [0] * threads
    for dst, src in sorted(pieces, key=lambda p: -p[0].nbytes):
        j = load.index(min(load))
        bins[j].append((dst, src))
        load[j] += dst.nbytes

    def run(b: list[Job]) -> None:
        with torch.no_grad():
            copy_all(b)

    # The last bin is copied here, as this thread would only wait. Every copy ends
    # before this returns, a failed one too: they fill the save's buffers.
    *others, mine = [b for b in bins if b]
    submitted = []
    try:
        for b in others:
            submitted.append(pool.submit(run, b))
        run(mine)
    finally:
        wait_all(submitted)
