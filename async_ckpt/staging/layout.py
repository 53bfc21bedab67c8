"""Where each staged tensor lives: arena offsets, waves, and splits under a memory budget.

Without a budget a state is one *wave*: every item has its own slot in one
arena the size of the state. With a budget (``max_staging_bytes``) each
arena holds at most ``budget // num_buffers`` bytes, so the items are packed
in order into several waves that take turns in the arenas; a tensor bigger
than one arena is cut along its first dimension into row blocks, each saved
as its own chunk (the format stores sharded tensors the same way). Without a
budget, ``wave_bytes`` cuts the one arena into consecutive parts instead
(:func:`in_parts`), so that the first part is written while the next is copied.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import torch

from ..errors import CheckpointError
from ..state.model import LocalState, TensorItem
from .arena import ALIGNMENT, align, slot_start


@dataclass
class Layout:
    """Per wave, the item indices and their arena offsets; equal layouts reuse arenas.

    ``shared_arena``: the waves are consecutive parts of one arena (written
    while later parts are still being copied) rather than turns in the buffers.
    """

    waves: list[tuple[list[int], list[int]]]
    nbytes: int  # the size of each arena
    signature: tuple
    shared_arena: bool = False


def storage_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors that view the same bytes the same way (tied weights)."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def plan_layout(
    items: list[TensorItem], tensors: list[torch.Tensor], capacity: int | None = None
) -> Layout:
    """Arena offsets for each item, packed into waves of at most ``capacity`` bytes.

    Identical views of one storage within a wave share a slot. Every item must
    already fit ``capacity`` (see :func:`split_to_fit`).
    """
    waves: list[tuple[list[int], list[int]]] = []
    indices: list[int] = []
    offsets: list[int] = []
    slot_of: dict[tuple, int] = {}
    end = largest = 0
    for n, (item, tensor) in enumerate(zip(items, tensors, strict=True)):
        key = storage_key(tensor)
        if key in slot_of and tensor.numel() > 0:
            indices.append(n)
            offsets.append(slot_of[key])
            continue
        size = align(item.nbytes)
        start = slot_start(end, item.nbytes)
        if capacity is not None and start + size > capacity and indices:
            waves.append((indices, offsets))
            indices, offsets, slot_of, start = [], [], {}, 0
        slot_of[key] = start
        indices.append(n)
        offsets.append(start)
        end = start + size
        largest = max(largest, end)
    waves.append((indices, offsets))
    signature = tuple((it.dtype, it.sizes) for it in items) + tuple(
        (tuple(i), tuple(o)) for i, o in waves
    )
    return Layout(waves, largest, signature)


def tied_items(layout: Layout, items: list[TensorItem]) -> list[int]:
    """The items that share their slot with another item of their wave (an empty
    item takes the next item's offset but shares nothing)."""
    tied: list[int] = []
    for indices, offsets in layout.waves:
        real = [(n, off) for n, off in zip(indices, offsets, strict=True) if items[n].nbytes]
        counts = Counter(off for _, off in real)
        tied += [n for n, off in real if counts[off] > 1]
    return tied


def in_parts(layout: Layout, items: list[TensorItem], part_bytes: int) -> Layout:
    """A one-wave layout cut into waves of about ``part_bytes``, in the same arena."""
    if len(layout.waves) != 1 or not part_bytes:
        return layout
    waves: list[tuple[list[int], list[int]]] = [([], [])]
    filled = 0
    for n, off in zip(*layout.waves[0], strict=True):
        if filled >= part_bytes:
            waves.append(([], []))
            filled = 0
        waves[-1][0].append(n)
        waves[-1][1].append(off)
        filled += items[n].nbytes
    if len(waves) == 1:
        return layout
    return Layout(waves, layout.nbytes, (layout.signature, part_bytes), shared_arena=True)


def buffer_capacity(budget: int, num_buffers: int) -> int:
    """Bytes one arena may hold under ``budget`` for all ``num_buffers`` arenas."""
    capacity = (budget // num_buffers) // ALIGNMENT * ALIGNMENT
    if capacity < ALIGNMENT:
        raise CheckpointError(
            f"max_staging_bytes={budget} is too small for {num_buffers} staging buffer(s)"
        )
    return capacity


def split_to_fit(
    state: LocalState, tensors: list[torch.Tensor], capacity: int
) -> tuple[LocalState, list[torch.Tensor]]:
    """Cut every item bigger than ``capacity`` into row blocks that fit; others unchanged."""
    if all(align(it.nbytes) <= capacity for it in state.items):
        return state, tensors
    items: list[TensorItem] = []
    pieces: list[torch.Tensor] = []
    for item, tensor in zip(state.items, tensors, strict=True):
        if align(item.nbytes) <= capacity:
            items.append(item)
            pieces.append(tensor)
            continue
        row_bytes = item.nbytes // item.sizes[0] if item.sizes and item.sizes[0] else 0
        rows = capacity // row_bytes if row_bytes else 0
        if rows == 0:
            raise CheckpointError(
                f"tensor {item.key!r} ({item.nbytes} bytes, shape {list(item.sizes)}) cannot "
                f"be cut to fit a staging buffer of {capacity} bytes: one row along its first "
                "dimension is larger. Raise max_staging_bytes (it is shared by all buffers)."
            )
        for start in range(0, item.sizes[0], rows):
            count = min(rows, item.sizes[0] - start)
            items.append(
                replace(
                    item,
                    offsets=(item.offsets[0] + start, *item.offsets[1:]),
                    sizes=(count, *item.sizes[1:]),
                )
            )
            pieces.append(tensor.narrow(0, start, count))
    return replace(state, items=items, known_fingerprints=None), pieces
