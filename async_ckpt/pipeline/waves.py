"""The waves a save writes, built from wherever the bytes are.

:func:`~async_ckpt.pipeline.save.run_save` takes one input shape: waves of
bytes, each written into new data files before the next is asked for. The
tensor bytes come from the caller's memory (synchronous ``save``), from a
snapshot's arenas in this process (thread executor) or from the same arenas
mapped by the worker process (process executor); the state's pickled objects
follow as a wave of their own in every case.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass
from functools import partial

import torch

from ..staging.arena import Arena
from ..staging.snapshot import Snapshot, WavePlace, item_views
from ..state.describe import tensor_bytes
from ..state.model import LocalState


def _nothing_to_release(ok: bool) -> None:
    """Bytes that no staging buffer holds: nothing waits for their write."""


@dataclass(frozen=True)
class WaveData:
    """Bytes written together: some of a state's tensor items, or all of its objects.

    ``items`` are indices into ``LocalState.items`` (into ``LocalState.objects``
    for the objects wave), ``sources`` their bytes, aligned. ``written(ok)`` is
    called once they are stored (``ok``) or skipped after a failed write (not
    ``ok``: the stager may stop copying the rest), and lets the stager reuse
    their buffer.
    """

    items: Sequence[int]
    sources: Sequence[memoryview]
    written: Callable[[bool], None] = _nothing_to_release
    objects: bool = False  # the objects wave, written by rank 0 alone


def object_waves(state: LocalState) -> list[WaveData]:
    """The objects wave of ``state``, if it has objects: their pickled payloads."""
    if not state.objects:
        return []
    payloads = [memoryview(o.payload) for o in state.objects]
    return [WaveData(range(len(state.objects)), payloads, objects=True)]


def _contiguous_cpu(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cpu":
        return tensor.to("cpu")
    return tensor if tensor.is_contiguous() else tensor.contiguous()


SMALL_TENSOR_BYTES = 64 * 1024
"""Tensors this small are written from one packed copy: a byte view per tensor
costs more than copying its bytes (about 10 us each, 1 s at 100k tensors)."""

MAX_PACKED_BYTES = 256 * 1024 * 1024
"""The most bytes packed copies may add to a synchronous save's memory."""


def memory_waves(state: LocalState, tensors: Sequence[torch.Tensor]) -> list[WaveData]:
    """The waves of a save straight from the caller's tensors (aligned with ``state.items``).

    Contiguous CPU tensors are written from their own memory, except small ones,
    which are packed per dtype into one buffer by a single call (up to
    :data:`MAX_PACKED_BYTES`); others are made contiguous CPU copies first.
    """
    sources: list[memoryview | None] = [None] * len(tensors)
    small: dict[torch.dtype, list[int]] = {}
    packed = 0
    for n, t in enumerate(tensors):
        nbytes = t.nbytes
        if (
            t.device.type == "cpu"
            and 0 < nbytes <= SMALL_TENSOR_BYTES
            and packed + nbytes <= MAX_PACKED_BYTES
        ):
            small.setdefault(t.dtype, []).append(n)
            packed += nbytes
        else:
            sources[n] = tensor_bytes(_contiguous_cpu(t))
    for indices in small.values():
        for n, view in zip(indices, _packed([tensors[n] for n in indices]), strict=True):
            sources[n] = view
    return [WaveData(range(len(state.items)), sources), *object_waves(state)]


def _packed(tensors: list[torch.Tensor]) -> Iterator[memoryview]:
    """Byte views of ``tensors`` (CPU, one dtype), copied back to back into one buffer."""
    flat = torch._utils._flatten_dense_tensors(tensors)  # one C++ call for the lot
    data = tensor_bytes(flat)
    pos = 0
    for t in tensors:
        yield data[pos : pos + t.nbytes]
        pos += t.nbytes


def staged_waves(
    state: LocalState,
    arenas: Sequence[Arena],
    places: Iterable[WavePlace],
    written: Callable[[int, bool], None],
) -> Iterator[WaveData]:
    """The waves of a save staged in ``arenas``, each as ``places`` yields it, then the objects.

    ``places`` may wait for each wave to be staged; ``written(index, ok)``
    reports wave ``index`` written (or skipped) to whoever holds its buffer.
    """
    for place in places:
        sources = item_views(arenas[place.buffer], state, place.items, place.offsets)
        yield WaveData(place.items, sources, partial(written, place.index))
    yield from object_waves(state)


def snapshot_waves(snapshot: Snapshot, aborted: Callable[[], bool]) -> Iterator[WaveData]:
    """The waves of ``snapshot`` in this process, each once it is staged.

    Raises what staging raised, or CancelledError once ``aborted()`` is true.
    """

    def places() -> Iterator[WavePlace]:
        for wave in snapshot.waves:
            wave.staged.result()  # raises if staging failed
            if aborted():
                raise CancelledError("aborted while its waves were staged")
            yield wave.place

    return staged_waves(snapshot.state, snapshot.arenas, places(), snapshot.wave_written)
