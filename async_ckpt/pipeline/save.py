"""One save on one rank, after the state is described: plan, validate, write, commit.

The same function runs in the caller's process (synchronous save, thread
executor) and in the worker process; only where the bytes come from differs,
and :mod:`async_ckpt.pipeline.waves` turns each of those into the same waves.
"""

from __future__ import annotations

import operator
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..dist.comm import Comm
from ..errors import SaveFailedError, StateDictError
from ..format.checksum import DEFAULT_BLOCK_SIZE
from ..format.metadata import (
    DIGEST_VERSION,
    FORMAT_VERSION,
    Chunk,
    Metadata,
    ObjectEntry,
    TensorEntry,
    ValueEntry,
)
from ..planning.plan import Planner
from ..state.model import LocalState
from ..storage.base import StorageWriter
from .commit import check_extra, commit_checkpoint
from .incremental import BaseChunks, Incremental, row_blocks
from .waves import WaveData
from .write import SegmentRecord, write_rank_files

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


class _WrittenChunk(NamedTuple):
    """A tensor chunk this rank wrote: which piece of which tensor, and where it landed."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    record: SegmentRecord


class _WrittenObject(NamedTuple):
    """An object entry rank 0 wrote, and where it landed."""

    key: str
    file: str
    record: SegmentRecord


@dataclass
class _RankResult:
    """What one rank reports to the coordinator (gathered from every rank)."""

    ok: bool
    error: str = ""
    chunks: list[_WrittenChunk] = field(default_factory=list)
    objects: list[_WrittenObject] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)
    shared: dict[str, int] = field(default_factory=dict)  # of ``files``: the base's


def _incremental_extra(incremental: Incremental, results: list[_RankResult]) -> dict[str, Any]:
    """``extra["incremental"]``: what the ranks wrote and what they shared, for inspect."""
    shared = {name: size for res in results for name, size in res.shared.items()}
    written = sum(size for res in results for name, size in res.files.items() if name not in shared)
    info: dict[str, Any] = {
        "new_bytes": written,
        "shared_bytes": sum(shared.values()),
        "shared_files": len(shared),
    }
    if incremental.base is not None:
        info["base"] = incremental.base
    return {"incremental": info}


def _in_order(chunks: list[Chunk]) -> tuple[Chunk, ...]:
    """A tensor's chunks by offsets (most tensors have one: nothing to sort)."""
    return tuple(chunks) if len(chunks) < 2 else tuple(sorted(chunks, key=_offsets))


_offsets = operator.attrgetter("offsets")


def _assemble(
    state: LocalState,
    results: list[_RankResult],
    save_id: str,
    block: int,
    extra: dict[str, Any],
    version: int,
) -> Metadata:
    chunks_by_key: dict[str, list[Chunk]] = {}
    for res in results:
        for c in res.chunks:
            rec = c.record
            chunk = Chunk(
                c.offsets, c.sizes, c.file, rec.offset, rec.nbytes, rec.checksums, rec.digest
            )
            chunks_by_key.setdefault(c.key, []).append(chunk)
    entries: dict = {}
    for item in state.items:
        if item.key not in entries:
            chunks = _in_order(chunks_by_key.get(item.key, []))
            entries[item.key] = TensorEntry(item.path, item.dtype, item.shape, chunks, item.numpy)
    for stub in state.stubs:  # a tensor the coordinator holds no piece of: others wrote it
        chunks = _in_order(chunks_by_key.get(stub.key, []))
        if not chunks and 0 not in stub.shape:
            raise StateDictError(
                f"tensor {stub.key!r} has no piece on any rank: every rank is outside its "
                "DTensor's mesh, so there is nothing to save"
            )
        entries[stub.key] = TensorEntry(stub.path, stub.dtype, stub.shape, chunks)
    for key, (path, value) in state.values.items():
        entries[key] = ValueEntry(path, value)
    objects = {o.key: o for o in state.objects}
    for o in results[0].objects:
        obj = objects[o.key]
        entries[o.key] = ObjectEntry(
            obj.path, obj.type_name, o.file, o.record.offset, o.record.nbytes, o.record.checksums
        )
    files = {name: size for res in results for name, size in res.files.items()}
    return Metadata(
        save_id=save_id,
        world_size=len(results),
        block_size=block,
        files=files,
        containers=state.containers,
        entries=entries,
        extra=extra,
        version=version,
    )


def _wave_pieces(
    state: LocalState, wave: WaveData, mine: set[int], split: bool
) -> list[tuple[str, tuple[int, ...], tuple[int, ...], memoryview]]:
    """This rank's chunks in a tensor wave as (key, offsets, sizes, bytes), in one pass;
    with ``split`` (incremental saves) big tensors as row blocks, each shared or
    written on its own."""
    pieces: list[tuple[str, tuple[int, ...], tuple[int, ...], memoryview]] = []
    items = state.items
    for i, src in zip(wave.items, wave.sources, strict=True):
        if i in mine:
            it = items[i]
            if split:
                pieces += [(it.key, *block) for block in row_blocks(it.offsets, it.sizes, src)]
            else:
                pieces.append((it.key, it.offsets, it.sizes, src))
    return pieces


def run_save(
    state: LocalState,
    waves: Iterable[WaveData],
    writer: StorageWriter,
    comm: Comm,
    planner: Planner,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    timings: SaveTimings | None = None,
    should_abort: Callable[[], bool] | None = None,
    extra: Mapping[str, Any] | None = None,
    incremental: Incremental | None = None,
) -> Metadata:
    """Plan, validate, write and commit one save; every rank calls it with its own state.

    ``waves`` yields the bytes of ``state`` a few items at a time (see
    :mod:`async_ckpt.pipeline.waves`), each wave written before the next is
    asked for; rank 0 alone writes the objects wave. ``should_abort`` is
    asked once more just before the commit (cancellation). ``extra`` (see
    :func:`~async_ckpt.pipeline.commit.check_extra`) goes into the metadata's
    ``extra`` field; rank 0's is the one committed. ``incremental`` (see
    :mod:`.incremental`) records chunk digests and shares the chunks whose
    bytes equal its base's instead of writing them. Returns the
    committed metadata on every rank, or raises: the original error on a
    single rank, :class:`SaveFailedError` naming each failing rank otherwise.
    """
    timings = timings or SaveTimings()
    t0 = time.perf_counter()
    full_plans = planner.full_plans
    plan = planner.plan(state, comm)  # raises RankMismatchError on every rank alike
    timings.plan_reused = planner.full_plans == full_plans
    timings.plan_s = time.perf_counter() - t0
    save_id = new_save_id()
    threads = writer.thread_count or DEFAULT_WRITE_THREADS
    mine = set(plan.items_for(state, comm.rank))
    written: dict[str, int] = {}
    chunks: list[_WrittenChunk] = []
    objects: list[_WrittenObject] = []
    local_error: BaseException | None = None

    base: BaseChunks | None = None

    def write(
        segments: list[memoryview], places: list | None = None
    ) -> dict[int, tuple[str, SegmentRecord]]:
        return write_rank_files(
            writer, segments, comm.rank, save_id, threads, block_size, written, places, base
        )

    t1 = time.perf_counter()
    pending = iter(waves)
    wave: WaveData | None = None
    try:
        writer.prepare(coordinator=comm.rank == 0)
        if incremental is not None and incremental.base is not None:
            base = BaseChunks.load(writer, incremental.base, save_id, comm.rank)
        for wave in pending:
            if not wave.objects:
                pieces = _wave_pieces(state, wave, mine, split=incremental is not None)
                places = [p[:3] for p in pieces] if incremental is not None else None
                placed = write([p[3] for p in pieces], places)
                for n, (key, offsets, sizes, _) in enumerate(pieces):
                    chunks.append(_WrittenChunk(key, offsets, sizes, *placed[n]))
            elif comm.rank == 0:  # objects are written once, by the coordinator
                placed = write(list(wave.sources))
                objects += [
                    _WrittenObject(state.objects[i].key, *placed[n])
                    for n, i in enumerate(wave.items)
                ]
            wave.written(True)
            wave = None
        shared = base.shared if base is not None else {}
        result = _RankResult(
            ok=True, chunks=chunks, objects=objects, files={**written, **shared}, shared=shared
        )
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
                # checked here too (callers check at the call), where a failure reaches every rank
                checked, version = check_extra(extra), FORMAT_VERSION
                if incremental is not None:
                    checked.update(_incremental_extra(incremental, results))
                    version = DIGEST_VERSION
                metadata = _assemble(state, results, save_id, block_size, checked, version)
                outcome = commit_checkpoint(writer, metadata)
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
    # this save's files and the links or copies it made, all named by its own save id
    writer.abort([*written, *(base.shared if base is not None else ())])
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
