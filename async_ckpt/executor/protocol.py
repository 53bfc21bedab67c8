"""The messages between the caller and its worker process, both ways.

:mod:`async_ckpt.executor.wire` carries them (pickled, with the arena file
descriptors beside :class:`Arenas`). What stays the same from save to save
goes once: the arenas once per arena generation, the state's
:class:`Structure` (its tensor items, stubs and containers: 100k items for a
large model) once per structure; each :class:`Save` then carries only what
changes every save and names the structure it belongs to.

Caller to worker: :class:`Ping`, :class:`Arenas`, :class:`Structure`,
:class:`Save`, :class:`WaveStaged`, :class:`Close`. Worker to caller:
:class:`Pong`, :class:`WaveWritten`, :class:`Done`, :class:`Failed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..format.metadata import Metadata
from ..pipeline.incremental import Incremental
from ..pipeline.save import SaveTimings
from ..staging.snapshot import WavePlace
from ..state.flatten import KeyPath
from ..state.model import LocalState, ObjectItem, TensorItem, TensorStub

# --------------------------------------------------------------- caller to worker


@dataclass(frozen=True)
class Ping:
    """Answer with :class:`Pong` (the worker has started and is listening)."""


@dataclass(frozen=True)
class Close:
    """Exit once the save in hand (if any) is over."""


@dataclass(frozen=True)
class Arenas:
    """Map these arenas (their fds ride beside the message, in order) in place of the old."""

    sizes: list[int]


@dataclass(frozen=True)
class Structure:
    """What the saves of one state structure share; replaces the previous structure."""

    generation: int
    items: list[TensorItem]
    stubs: list[TensorStub]
    containers: dict[str, str]

    @classmethod
    def of(cls, state: LocalState, generation: int) -> Structure:
        return cls(generation, list(state.items), list(state.stubs), dict(state.containers))

    def describes(self, state: LocalState) -> bool:
        """Whether ``state`` has this structure (identical items compare at C speed)."""
        return (
            self.items == state.items
            and self.stubs == state.stubs
            and self.containers == state.containers
        )

    def state(self, save: Save) -> LocalState:
        """The state of ``save``: this structure with the save's own values and objects."""
        return LocalState(
            items=self.items,
            values=save.values,
            objects=save.objects,
            containers=self.containers,
            stubs=self.stubs,
            known_fingerprints=save.fingerprints,
        )


@dataclass(frozen=True)
class Save:
    """Save ``save_no`` of structure ``structure``; its first wave is staged.

    ``writer`` is the pickled storage writer (pickled apart, so that one the
    worker cannot import fails this save alone); ``group`` how the worker joins
    the ranks' group (None on one rank); ``waves`` how many waves follow the
    first as :class:`WaveStaged`; ``extra`` the application data for the
    metadata's ``extra`` field (checked by the caller); ``incremental`` as in
    :class:`~async_ckpt.pipeline.incremental.Incremental` (None: a full save).
    """

    save_no: int
    structure: int
    values: dict[str, tuple[KeyPath, dict[str, Any]]]
    objects: list[ObjectItem]
    fingerprints: tuple[str, str] | None
    writer: bytes
    group: dict[str, Any] | None
    waves: int
    first: WavePlace
    extra: dict[str, Any] = field(default_factory=dict)
    incremental: Incremental | None = None


@dataclass(frozen=True)
class WaveStaged:
    """A further wave of save ``save_no`` is staged at ``place``, or staging failed (``error``)."""

    save_no: int
    place: WavePlace | None = None
    error: BaseException | None = None


# --------------------------------------------------------------- worker to caller


@dataclass(frozen=True)
class Pong:
    """The worker's answer to :class:`Ping`."""

    pid: int


@dataclass(frozen=True)
class WaveWritten:
    """Wave ``wave`` of save ``save_no`` is written (or skipped after a failed write:
    not ``ok``), so its buffer may be reused."""

    save_no: int
    wave: int
    ok: bool = True


@dataclass(frozen=True)
class Done:
    """Save ``save_no`` committed ``metadata``."""

    save_no: int
    metadata: Metadata
    timings: SaveTimings = field(default_factory=SaveTimings)


@dataclass(frozen=True)
class Failed:
    """Save ``save_no`` failed with ``error``; nothing was committed."""

    save_no: int
    error: BaseException
    timings: SaveTimings = field(default_factory=SaveTimings)
