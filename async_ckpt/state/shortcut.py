"""The same flat dict of tensors saved again: its description reused without a walk.

A state of 100k small tensors in one flat dict costs the caller about 0.3 s
to flatten and 0.4 s to describe per save, even with :class:`DescribeCache`,
because both walk every leaf in Python. :class:`FlatDictShortcut` remembers
the previous save's description when the state was one flat dict of plain
tensors, each saved as itself. The next save reuses it if the dict holds the
same keys, in the same order, with the same tensor objects of the same dtype
and shape, none on the meta device. Every one of these checks runs in C
(``map`` over the values): 70-100 ms at 100k tensors, most of it building the
``torch.Size`` objects that a resized tensor makes necessary to compare. Anything else (a
value, a nested dict, a Stateful object, a changed key or tensor) takes the
full walk. The tensors' bytes and memory (``.data`` swaps, strides) are not
part of the description: the stager's layout cache checks those itself.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .model import LocalState

_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")
_is_meta = operator.attrgetter("is_meta")


@dataclass
class _Previous:
    keys: list[Any]
    tensors: list[weakref.ref]  # weak: the shortcut keeps no tensor alive
    dtypes: list[torch.dtype]
    shapes: list[torch.Size]
    state: LocalState


class FlatDictShortcut:
    """The previous save's description of a flat dict of tensors, reused while it holds."""

    def __init__(self) -> None:
        self._previous: _Previous | None = None
        self.hits = 0

    def lookup(self, state_dict: Any) -> tuple[LocalState, list[torch.Tensor]] | None:
        """The description of ``state_dict`` if it is the remembered one's; else None."""
        previous = self._previous
        if previous is None or type(state_dict) is not dict:
            return None
        if len(state_dict) != len(previous.keys):
            return None
        tensors = list(state_dict.values())
        if not all(map(operator.is_, tensors, [ref() for ref in previous.tensors])):
            return None
        if (
            list(state_dict) != previous.keys
            or list(map(_dtype, tensors)) != previous.dtypes
            or list(map(_shape, tensors)) != previous.shapes
            or any(map(_is_meta, tensors))
        ):
            return None
        last = previous.state
        if last.known_fingerprints is None:  # the first reuse: hash the structure once
            last.known_fingerprints = (last.keys_fingerprint(), last.plan_fingerprint())
        self.hits += 1
        state = LocalState(
            items=list(last.items),
            containers=dict(last.containers),
            known_fingerprints=last.known_fingerprints,
        )
        return state, tensors

    def remember(self, state_dict: Any, state: LocalState, tensors: list[torch.Tensor]) -> None:
        """After a full walk: keep its description if the shortcut can serve the next save
        (a flat dict whose values are plain tensors, each saved as itself, in order)."""
        self._previous = None
        if type(state_dict) is not dict or state.values or state.objects or state.stubs:
            return
        values = list(state_dict.values())
        if (
            len(values) != len(tensors)
            or len(state.items) != len(tensors)
            # with a cache, describe() hands over a plain tensor leaf as itself
            or not all(map(operator.is_, values, tensors))
        ):
            return
        self._previous = _Previous(
            keys=list(state_dict),
            tensors=[weakref.ref(t) for t in values],
            dtypes=list(map(_dtype, values)),
            shapes=list(map(_shape, values)),
            state=state,
        )
