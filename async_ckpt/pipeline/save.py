"""One save on one rank, after the state is described: plan, validate, write, commit.

The same function runs in the caller's process (synchronous save, thread
executor) and in the worker process; only where the tensor bytes come from
differs (caller memory, given as ``sources``, or staging-arena waves).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..dist.comm import Comm
from ..errors import SaveFailedError, StateDictError
from ..format.checksum import DEFAULT_BLOCK_SIZE
from ..format.metadata import Chunk, Metadata, ObjectEntry, TensorEntry, ValueEntry
from ..planning.plan import Planner
from ..state.model import LocalState
from ..storage.base import StorageWriter
from .commit import commit_checkpoint
from .write import write_rank_files

DEFAULT_WRITE_THREADS = 4


def new_save_id() -> str:
    """A fresh token that names this save's data files, so saves never mix files."""
    return secrets.token_hex(8)


@dataclass
class SaveTimings:
    """Where the background part of a save spent its time (seconds)."""

    plan_s: float = 0.0
    write_s: float = 0.0
    commit_s: float = 0.0
    bytes_written: int = 0
    plan_reused: bool = False


@dataclass
class WaveData:
    """Staged bytes of some of a state's items, written together.

    ``items`` are indices into ``LocalState.items``, ``sources`` their bytes
    (aligned); ``written(ok)`` is called once they are stored (``ok``) or
    skipped after a failed write (not ``ok``: the stager may stop copying the
    rest), and lets the stager reuse their buffer.
    """

    items: list[int]
    sources: Sequence[memoryview]
    written: Callable[[bool], None] = lambda ok: None


@dataclass
class _RankResult:
    ok: bool
    error: str = ""
    chunks: list[tuple] = field(default_factory=list)
    objects: list[tuple] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)


def _assemble(state: LocalState, results: list[_RankResult], save_id: str, block: int) -> Metadata:
    chunks_by_key: dict[str, list[Chunk]] = {}
    for res in results:
        for key, offsets, sizes, name, rec in res.chunks:
            chunk = Chunk(offsets, sizes, name, rec.offset, rec.nbytes, rec.checksums)
            chunks_by_key.setdefault(key, []).append(chunk)
    entries: dict = {}
    for item in state.items:
        if item.key not in entries:
            chunks = sorted(chunks_by_key.get(item.key, []), key=lambda c: c.offsets)
            entries[item.key] = TensorEntry(
                item.path, item.dtype, item.shape, tuple(chunks), item.numpy
            )
    for stub in state.stubs:  # a tensor the coordinator holds no piece of: others wrote it
        chunks = sorted(chunks_by_key.get(stub.key, []), key=lambda c: c.offsets)
        if not chunks and 0 not in stub.shape:
            raise StateDictError(
                f"tensor {stub.key!r} has no piece on any rank: every rank is outside its "
                "DTensor's mesh, so there is nothing to save"
            )
        entries[stub.key] = TensorEntry(stub.path, stub.dtype, stub.shape, tuple(chunks))
    for key, (path, value) in state.values.items():
        entries[key] = ValueEntry(path, value)
    objects = {o.key: o for o in state.objects}
    for key, name, rec in results[0].objects:
        obj = objects[key]
        entries[key] = ObjectEntry(
            obj.path, obj.type_name, name, rec.offset, rec.nbytes, rec.checksums
        )
    files = {name: size for res in results for name, size in res.files.items()}
    return Metadata(
        save_id=save_id,
        world_size=len(results),
        block_size=block,
        files=files,
        containers=state.containers,
        entries=entries,
    )


def run_save(
    state: LocalState,
    sources: Sequence[memoryview] | None,
    writer: StorageWriter,
    comm: Comm,
    planner: Planner,
    *,
    waves: Iterable[WaveData] | None = None,
    write_threads: int = DEFAULT_WRITE_THREADS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    timings: SaveTimings | None = None,
    should_abort: Callable[[], bool] | None = None,
) -> Metadata:
    """Plan, validate, write and commit one save; every rank calls it with its own state.

    ``sources[i]`` holds the contiguous bytes of ``state.items[i]``; or else
    ``waves`` yields them a few items at a time (a state staged in waves), each
    wave written before the next is asked for. ``should_abort`` is asked once
    more just before the commit (cancellation). Returns the committed metadata
    on every rank, or raises: the original error on a single rank,
    :class:`SaveFailedError` naming each failing rank otherwise.
    """
    timings = timings or SaveTimings()
    if waves is None:
        waves = [WaveData(list(range(len(state.items))), sources or [])]
    t0 = time.perf_counter()
    full_plans = planner.full_plans
    plan = planner.plan(state, comm)  # raises RankMismatchError on every rank alike
    timings.plan_reused = planner.full_plans == full_plans
    timings.plan_s = time.perf_counter() - t0
    save_id = new_save_id()
    threads = writer.thread_count or write_threads
    mine = set(plan.items_for(state, comm.rank))
    objects = state.objects if comm.rank == 0 else []
    written: dict[str, int] = {}
    chunks: list[tuple] = []
    object_records: list[tuple] = []
    local_error: BaseException | None = None
    t1 = time.perf_counter()
    pending = iter(waves)
    wave: WaveData | None = None
    try:
        writer.prepare(coordinator=comm.rank == 0)
        for number, wave in enumerate(pending):
            picked = [
                (i, src) for i, src in zip(wave.items, wave.sources, strict=True) if i in mine
            ]
            segments = [src for _, src in picked]
            if number == 0:
                segments += [memoryview(o.payload) for o in objects]
            placed = write_rank_files(
                writer, segments, comm.rank, save_id, threads, block_size, written
            )
            for n, (i, _) in enumerate(picked):
                it = state.items[i]
                chunks.append((it.key, it.offsets, it.sizes, *placed[n]))
            if number == 0:
                object_records = [(o.key, *placed[len(picked) + n]) for n, o in enumerate(objects)]
            wave.written(True)
            wave = None
        result = _RankResult(ok=True, chunks=chunks, objects=object_records, files=written)
        timings.bytes_written = sum(written.values())
    except Exception as exc:  # reported to the coordinator, re-raised below
        local_error = exc
        result = _RankResult(ok=False, error=f"{type(exc).__name__}: {exc}")
        if wave is not None:
            wave.written(False)
        _drain(pending)
    timings.write_s = time.perf_counter() - t1

    t2 = time.perf_counter()
    results = comm.gather_object(result) if comm.world_size > 1 else [result]
    outcome: Metadata | dict[int, str]
    if comm.rank == 0:
        failures = {r: res.error for r, res in enumerate(results) if not res.ok}
        if should_abort is not None and should_abort():
            failures[0] = "SaveFailedError: the save was cancelled or timed out before its commit"
        if failures:
            outcome = failures
        else:
            try:
                metadata = _assemble(state, results, save_id, block_size)
                commit_checkpoint(writer, metadata)
                outcome = metadata
            except Exception as exc:
                local_error = exc
                outcome = {0: f"{type(exc).__name__}: {exc} (while committing)"}
    else:
        outcome = None  # type: ignore[assignment]
    if comm.world_size > 1:
        outcome = comm.broadcast_object(outcome)
    timings.commit_s = time.perf_counter() - t2
    if isinstance(outcome, Metadata):
        return outcome
    writer.abort(written)
    if comm.world_size == 1 and local_error is not None:
        raise local_error
    lines = "\n".join(f"  rank {r}: {msg}" for r, msg in sorted(outcome.items()))
    raise SaveFailedError(
        f"save to {writer.checkpoint_id!r} failed on {len(outcome)} of {comm.world_size} "
        f"rank(s); nothing was committed:\n{lines}",
        failures=outcome,
    )


def _drain(pending: Iterable[WaveData]) -> None:
    """After a failed write, let the rest of the waves go so their buffers free up."""
    try:
        for wave in pending:
            wave.written(False)
    except Exception:
        pass  # the save has failed already; staging stopped too
