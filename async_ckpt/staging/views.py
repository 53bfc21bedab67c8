"""Typed views of many arena slots at once.

A view per slot made as ``bytes[a:b].view(dtype).view(shape)`` is three
tensor calls; at 100k tensors that was 2.5 s of a first save. Here slots of
one dtype are cut from one typed view by a single ``split_with_sizes`` (gaps
between slots included as pieces that are dropped), and only tensors of more
than one dimension are reshaped after.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def typed_views(
    data: torch.Tensor, slots: Sequence[tuple[int, int]], like: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Views of ``data`` (uint8) at ``slots`` (offset, nbytes; non-empty), each typed
    and shaped as the tensor of ``like`` at the same index."""
    views: list[torch.Tensor | None] = [None] * len(slots)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(like):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, members in by_dtype.items():
        members.sort(key=lambda i: slots[i][0])
        pieces = _pieces(slots, members, like[members[0]].element_size())
        if pieces is None:  # overlapping or unaligned slots: one view each (as before)
            for i in members:
                off, nbytes = slots[i]
                views[i] = data[off : off + nbytes].view(dtype).view(like[i].shape)
            continue
        start, end, sizes, positions = pieces
        parts = data[start:end].view(dtype).split_with_sizes(sizes)
        for i, p in zip(members, positions, strict=True):
            t = like[i]
            views[i] = parts[p] if t.dim() == 1 else parts[p].view(t.shape)
    return views  # type: ignore[return-value]


def _pieces(
    slots: Sequence[tuple[int, int]], members: list[int], size: int
) -> tuple[int, int, list[int], list[int]] | None:
    """The element counts of slots and the gaps between them, from the first slot to
    the end of the last; and where each member's slot is among them."""
    start = pos = slots[members[0]][0]
    sizes: list[int] = []
    positions: list[int] = []
    for i in members:
        off, nbytes = slots[i]
        if off < pos or off % size or nbytes % size:
            return None
        if off > pos:
            sizes.append((off - pos) // size)
        positions.append(len(sizes))
        sizes.append(nbytes // size)
        pos = off + nbytes
    return start, pos, sizes, positions
