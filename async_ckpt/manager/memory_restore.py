"""Which memory-tier step the ranks restore, and who fetches what from whom.

Pure decisions on the ranks' :class:`Inventory` lists (gathered from every
rank): a step is restorable from memory when every rank can get its share of
it, from its own copy or from a replica some rank holds for it. The newest
such step wins; it is used only when it is at least as new as the newest
committed step in storage (else storage is newer, and is restored instead).
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory_store import Inventory


@dataclass(frozen=True)
class Fetch:
    """Rank ``needer`` lacks its own copy of the step: ``holder`` sends its replica."""

    needer: int
    holder: int


@dataclass(frozen=True)
class RestoreInfo:
    """Where :meth:`CheckpointManager.restore` found the step it restored.

    ``source`` is the job's, alike on every rank: ``"memory"`` (every rank used
    its own snapshot), ``"replica"`` (some ranks fetched theirs from peers, as
    ``fetched`` lists) or ``"storage"``. ``holder`` is this rank's: the rank it
    fetched its share from, None when it used its own. ``seconds``: the whole
    restore, as this rank saw it.
    """

    step: int
    source: str
    seconds: float
    holder: int | None = None
    fetched: tuple[Fetch, ...] = ()


def _holders(inventories: list[Inventory], rank: int, step: int) -> list[int]:
    """The ranks that can read a replica of ``rank``'s share of ``step`` (not itself;
    every rank of a node sees the replicas on that node)."""
    return [
        holder
        for holder, inventory in enumerate(inventories)
        if holder != rank and step in inventory.replicas.get(rank, ())
    ]


def _has(inventories: list[Inventory], rank: int, step: int) -> bool:
    return step in inventories[rank].own or bool(_holders(inventories, rank, step))


def newest_common_step(inventories: list[Inventory], step: int | None = None) -> int | None:
    """The newest step every rank can get (``step`` only, if given); None if none."""
    candidates: set[int] = set()
    for inventory in inventories:
        candidates.update(inventory.own)
        for steps in inventory.replicas.values():
            candidates.update(steps)
    if step is not None:
        candidates &= {step}
    for candidate in sorted(candidates, reverse=True):
        if all(_has(inventories, rank, candidate) for rank in range(len(inventories))):
            return candidate
    return None


def fetches(inventories: list[Inventory], step: int) -> list[Fetch]:
    """The transfers that give every rank its share of ``step`` (a rank with its own
    copy fetches nothing); ``step`` must be :func:`newest_common_step`'s answer.
    Each needer's holder is the one with the fewest fetches so far (lowest rank on a
    tie), so that a node's ranks serve the lost node's ranks side by side."""
    found = []
    load = [0] * len(inventories)
    for rank, inventory in enumerate(inventories):
        if step not in inventory.own:
            holders = _holders(inventories, rank, step)
            assert holders, "step is not restorable from memory"
            holder = min(holders, key=lambda h: (load[h], h))
            load[holder] += 1
            found.append(Fetch(rank, holder))
    return found


def fetch_rounds(plan: list[Fetch]) -> list[list[Fetch]]:
    """``plan`` in rounds where each rank sends at most one directory and receives at
    most one (a holder of several ranks' replicas sends one per round)."""
    rounds: list[list[Fetch]] = []
    for fetch in plan:
        for batch in rounds:
            if all(f.holder != fetch.holder for f in batch):
                batch.append(fetch)
                break
        else:
            rounds.append([fetch])
    return rounds
