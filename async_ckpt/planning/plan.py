"""Global save plan: key validation across ranks, dedup of replicated data, plan cache.

Per save, ranks exchange one fixed-size digest (two 16-byte fingerprints) in
a single tensor all-gather: no pickling, no size exchange. When every rank
reports the same key fingerprint and the same plan fingerprints as last time,
the cached plan is reused; the full chunk lists travel only when something
changed, and the per-rank key diff only when ranks disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dist.comm import Comm
from ..errors import RankMismatchError
from ..state.model import LocalState

ChunkId = tuple[str, tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class GlobalPlan:
    """Which rank writes each distinct chunk (replicated chunks are written once)."""

    writer_of: dict[ChunkId, int]

    def items_for(self, state: LocalState, rank: int) -> list[int]:
        """Indices into ``state.items`` that ``rank`` writes."""
        return [i for i, it in enumerate(state.items) if self.writer_of[it.chunk_id] == rank]


def assign_writers(per_rank: list[list[tuple[ChunkId, int]]]) -> GlobalPlan:
    """Give each chunk to one of the ranks holding it, balancing bytes (largest first)."""
    holders: dict[ChunkId, list[int]] = {}
    sizes: dict[ChunkId, int] = {}
    for rank, chunks in enumerate(per_rank):
        for chunk_id, nbytes in chunks:
            holders.setdefault(chunk_id, []).append(rank)
            sizes[chunk_id] = nbytes
    load = [0] * len(per_rank)
    writer_of: dict[ChunkId, int] = {}
    for chunk_id in sorted(sizes, key=lambda c: (-sizes[c], c)):
        rank = min(holders[chunk_id], key=lambda r: (load[r], r))
        writer_of[chunk_id] = rank
        load[rank] += sizes[chunk_id]
    return GlobalPlan(writer_of)


def key_mismatch_report(summaries: list[dict[str, str]]) -> str:
    """Per rank: the keys it has that some other rank lacks, and disagreeing entries."""
    all_keys = set().union(*summaries)
    lines = []
    for rank, summary in enumerate(summaries):
        only = sorted(k for k in summary if any(k not in other for other in summaries))
        if only:
            lines.append(f"  rank {rank} has keys other ranks lack: {only}")
    for key in sorted(all_keys):
        kinds = {s[key] for s in summaries if key in s}
        if len(kinds) > 1:
            per_rank = {r: s.get(key) for r, s in enumerate(summaries)}
            lines.append(f"  key {key!r} differs across ranks: {per_rank}")
    missing = [r for r, s in enumerate(summaries) if set(s) != all_keys]
    lines.append(f"  ranks missing keys: {missing}")
    return "\n".join(lines)


class Planner:
    """Builds (or reuses) the global plan for one rank; keeps the cache between saves."""

    def __init__(self) -> None:
        self._cache_key: tuple | None = None
        self._cache_plan: GlobalPlan | None = None
        self.full_plans = 0  # how many saves needed the full exchange (tests count this)

    def plan(self, state: LocalState, comm: Comm) -> GlobalPlan:
        """Validate keys across ranks and return the global plan (one collective if cached)."""
        keys_digest = bytes.fromhex(state.keys_fingerprint())
        digests = comm.all_gather_digests(keys_digest + bytes.fromhex(state.plan_fingerprint()))
        if len({d[: len(keys_digest)] for d in digests}) > 1:
            summaries = comm.all_gather_object(state.key_summary())
            raise RankMismatchError(
                "ranks disagree on the state dict they save (keys, shapes or dtypes); "
                "every rank must save the same keys:\n" + key_mismatch_report(summaries)
            )
        cache_key = tuple(digests)
        if cache_key == self._cache_key and self._cache_plan is not None:
            return self._cache_plan
        chunks = [(it.chunk_id, it.nbytes) for it in state.items]
        per_rank = comm.all_gather_object(chunks) if comm.world_size > 1 else [chunks]
        plan = assign_writers(per_rank)
        self.full_plans += 1
        self._cache_key, self._cache_plan = cache_key, plan
        return plan


def check_same_keys(state: LocalState, comm: Comm) -> None:
    """Raise RankMismatchError naming each rank's extra keys unless all ranks agree."""
    digests = comm.all_gather_digests(bytes.fromhex(state.keys_fingerprint()))
    if len(set(digests)) > 1:
        summaries = comm.all_gather_object(state.key_summary())
        raise RankMismatchError(
            "ranks disagree on the keys of their state dicts:\n" + key_mismatch_report(summaries)
        )
