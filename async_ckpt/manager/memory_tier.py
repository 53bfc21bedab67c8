"""The memory tier: every rank's newest snapshots as checkpoints in shared memory, with
a replica of each on a peer of another node.

:class:`MemoryTier` is the part of :class:`CheckpointManager` behind
``memory_every=N``. A memory save is an ordinary asynchronous save (the same
staging, so the same stall) of the rank's local view of the state
(:mod:`async_ckpt.state.local_view`) by a checkpointer of the rank's own, into
the node's memory root (:mod:`.memory_store`): committed (metadata last) and
checksummed like any checkpoint, and it outlives the training process. Once it
committed, a thread of the tier sends it to the rank ``ranks_per_node`` ahead
(the same local rank on the next node, in a ring) and receives the previous
node's, over a gloo group of the tier's own, never the training group
(:mod:`async_ckpt.dist.dir_transfer`); a replica counts once it is complete.
Each round starts by pruning the rank's own snapshots and the replicas it
holds to ``keep - 1`` older ones, so that at most ``keep`` exist with the new
one.

``restore`` gathers what every rank can read and restores the newest step all
of them can get (own copy, else a peer's replica fetched over the group) when
it is at least as new as the newest step in storage; it returns None (restore
from storage) when memory has nothing as new, or when any rank's fetch or
load (checksums verified) fails.
"""

from __future__ import annotations

import copy
import datetime
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from ..dist.comm import Comm, GroupComm, LocalComm
from ..dist.dir_transfer import Incoming, Outgoing, exchange
from ..executor import AsyncCheckpointer, SaveFuture
from ..gc_pause import gc_paused
from ..pipeline.load import run_load
from ..planning.keys import KeyCheck
from ..staging import Stager, StagerOptions
from ..storage.detect import detect_reader
from ..threads import Workers
from .memory_restore import RestoreInfo, fetch_rounds, fetches, newest_common_step
from .memory_store import MemoryStore, committed_steps

log = logging.getLogger("async_ckpt")

_TAG_REPLICATE = 7301
_TAG_FETCH = 7302


class MemoryTier:
    """One rank's memory tier; made by :class:`CheckpointManager` on every rank at once
    (with several ranks, making it is a collective: it creates a gloo group)."""

    def __init__(
        self,
        root: str,
        *,
        keep: int,
        ranks_per_node: int | None,
        executor: str,
        stager_options: StagerOptions,
        process_group: Any,
        distributed: bool,
        group_timeout: float,
    ) -> None:
        self.keep = keep
        self.group: Any = None
        rank, world_size = 0, 1
        if distributed:
            import torch.distributed as dist

            from ..dist.ranks import arrive

            ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
            rank, world_size = dist.get_rank(process_group), len(ranks)
            arrive(process_group, rank, world_size, "CheckpointManager(memory_every=...)")
            self.group = dist.new_group(
                ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=group_timeout)
            )
        self.rank, self.world_size = rank, world_size
        self.store = MemoryStore(root, rank, world_size)
        # the ring over nodes: send to the same local rank on the next node
        self.send_to: int | None = None
        self.receive_from: int | None = None
        per_node = self._agreed_ranks_per_node(ranks_per_node or world_size)
        if per_node is not None:
            self.send_to = (rank + per_node) % world_size
            self.receive_from = (rank - per_node) % world_size
        # the storage checkpointer's staging options (async staging, budget...): the same stall
        self.checkpointer = AsyncCheckpointer(
            executor=executor,
            no_dist=True,
            local_view=True,
            stager=Stager(copy.copy(stager_options)),
        )
        # a plain thread: a save from an atexit handler still replicates (async_ckpt.threads)
        self._after = Workers(1, "async_ckpt-memory", finish_at_exit=True)
        self._pending: SaveFuture | None = None
        self._round: Future | None = None
        self._written: list[int] = []  # steps of this run committed here, oldest first
        self._received: list[int] = []  # replicas of this run received here
        self._replicating = self.send_to is not None
        self._lock = threading.Lock()

    def _agreed_ranks_per_node(self, mine: int) -> int | None:
        """The ring's step when every rank gives the same ``ranks_per_node`` and it
        splits the ranks into two or more whole nodes; else None (no replicas: a
        ring built on unequal answers would pair sends with the wrong receives,
        and one that wraps inside a node would keep both copies on one node)."""
        if self.group is None:
            return None
        answers = set(self._comm().all_gather_object(mine))
        per_node = answers.pop() if len(answers) == 1 else None
        if per_node is not None and self.world_size > per_node and self.world_size % per_node == 0:
            return per_node
        if self.rank == 0:
            log.warning(
                "memory tier: no peer replicas: the %d ranks %s (ranks_per_node, or torchrun's "
                "LOCAL_WORLD_SIZE: %s)",
                self.world_size,
                "are on one node"
                if per_node is not None and per_node >= self.world_size
                else "do not form whole nodes of equal size",
                sorted(answers | ({per_node} if per_node else set())),
            )
        return None

    @property
    def replicates(self) -> bool:
        """Whether snapshots are copied to a peer (several nodes, and no failure yet)."""
        return self._replicating

    def _comm(self) -> Comm:
        return GroupComm(self.group) if self.group is not None else LocalComm()

    # --------------------------------------------------------------------- saves
    def save(self, step: int, state: Mapping[str, Any]) -> SaveFuture:
        """Snapshot ``state`` as memory step ``step``; returns once it is staged.

        Waits first for the previous memory save and its replication (never two
        rounds in flight: bounded memory)."""
        self.wait()
        try:
            future = self.checkpointer.save(
                state,
                checkpoint_id=self.store.own_step(step),
                extra={"memory_tier": {"step": step}},
            )
        except BaseException as exc:
            # the peers still take part in this step's round: a refusal keeps them in step
            self._start_round(step, None, exc)
            raise
        self._start_round(step, future, None)
        return future

    def _start_round(
        self, step: int, future: SaveFuture | None, error: BaseException | None
    ) -> None:
        with self._lock:
            self._pending = future
            self._round = self._after.submit(self._after_commit, step, future, error)

    def _after_commit(
        self, step: int, future: SaveFuture | None, error: BaseException | None
    ) -> None:
        """The tier's thread: make room (``keep - 1`` older snapshots, so that with the
        one being written at most ``keep`` exist), wait for the local commit, replicate."""
        self._prune(self.keep - 1, current=step)
        if future is not None:
            error = future.exception()
        if error is None:
            self._written.append(step)
        else:
            log.warning("memory-tier save of step %d failed: %s", step, error)
        if self._replicating:
            self._replicate(step, ok=error is None)

    def _replicate(self, step: int, ok: bool) -> None:
        assert self.send_to is not None and self.receive_from is not None
        t0 = time.perf_counter()
        src = self.receive_from
        try:
            received = exchange(
                self.group,
                Outgoing(
                    self.send_to, self.store.own_step(step) if ok else None, _TAG_REPLICATE, step
                ),
                Incoming(src, self.store.replica_step(src, step), _TAG_REPLICATE, step),
            )
        except Exception as exc:  # a peer is gone: the ring is broken for this run
            self._replicating = False
            log.warning(
                "memory tier: replication of step %d failed (%s); snapshots stay local from now on",
                step,
                exc,
            )
            return
        if received:
            self._received.append(step)
            log.debug(
                "memory tier: step %d sent to rank %d, rank %d's received in %.2f s",
                step,
                self.send_to,
                src,
                time.perf_counter() - t0,
            )
        else:
            log.warning("memory tier: no replica of rank %d's step %d was received", src, step)

    def _prune(self, keep: int, current: int) -> None:
        """Keep ``current`` (being saved) and the newest ``keep`` own snapshots and replicas
        up to this run's newest; newer ones are from an abandoned run (this one
        restarted from older state)."""
        dirs = [(self.store.own_dir(), self._written)]
        if self.receive_from is not None:
            dirs.append((self.store.replica_dir(self.receive_from), self._received))
        for directory, made in dirs:
            # before this run's first snapshot: anything newer than it is abandoned
            newest = max(made, default=current)
            steps = [s for s in committed_steps(directory) if s <= newest and s != current]
            kept = set(steps[-keep:]) if keep else set()
            removed = self.store.prune(directory, kept | {current})
            if removed:
                log.debug("memory tier: removed steps %s from %s", removed, directory)

    def idle(self) -> bool:
        """Whether no memory save or replication is in flight."""
        with self._lock:
            return self._round is None or self._round.done()

    def wait(self) -> None:
        """Wait for the memory save in flight and its replication (failures are logged)."""
        with self._lock:
            pending, round_ = self._pending, self._round
        if pending is not None:
            try:
                pending.result()
            except Exception:  # logged by the tier's thread
                pass
        if round_ is not None:
            try:
                round_.result()
            except Exception as exc:
                log.warning("memory tier: %s", exc)

    # ------------------------------------------------------------------- restore
    def restore(
        self,
        state: Mapping[str, Any],
        storage_step: int | None,
        step: int | None,
        strict: KeyCheck,
        allow_lossy_cast: bool,
    ) -> RestoreInfo | None:
        """Restore from memory if every rank can get a step at least as new as
        ``storage_step`` (exactly ``step``, if given); None means: use storage.

        Collective: every rank calls it together."""
        self.wait()
        t0 = time.perf_counter()
        comm = self._comm()
        # storage's newest as every rank saw it: all ranks must take the same branch
        gathered = comm.all_gather_object((self.store.inventory(), storage_step))
        inventories = [inventory for inventory, _ in gathered]
        seen = [s for _, s in gathered if s is not None]
        storage_step = max(seen) if seen else None
        chosen = newest_common_step(inventories, step)
        if chosen is None or (step is None and storage_step is not None and storage_step > chosen):
            if chosen is not None and self.rank == 0:
                log.info(
                    "memory tier: step %d is older than storage's step %d", chosen, storage_step
                )
            return None
        plan = fetches(inventories, chosen)
        fetched_ok = True
        try:
            for batch in fetch_rounds(plan):
                out = next((f for f in batch if f.holder == self.rank), None)
                inc = next((f for f in batch if f.needer == self.rank), None)
                got = exchange(
                    self.group,
                    Outgoing(
                        out.needer, self.store.replica_step(out.needer, chosen), _TAG_FETCH, chosen
                    )
                    if out
                    else None,
                    Incoming(inc.holder, self.store.own_step(chosen), _TAG_FETCH, chosen)
                    if inc
                    else None,
                )
                fetched_ok = fetched_ok and got is not False
        except Exception as exc:
            log.warning("memory tier: fetching replicas of step %d failed: %s", chosen, exc)
            fetched_ok = False
        if not all(comm.all_gather_object(fetched_ok)):
            self._log_fallback(chosen, "a replica could not be fetched")
            return None
        error: str | None = None
        try:
            reader = detect_reader(self.store.own_step(chosen))
            try:
                with gc_paused():  # as in async_ckpt.load: many entries, no cycles
                    run_load(
                        state, reader, strict=strict, allow_lossy_cast=allow_lossy_cast, local=True
                    )
            finally:
                reader.close()
        except Exception as exc:
            error = f"rank {self.rank}: {exc}"
        errors = [e for e in comm.all_gather_object(error) if e]
        if errors:
            self._log_fallback(chosen, "; ".join(errors))
            return None
        mine = next((f for f in plan if f.needer == self.rank), None)
        info = RestoreInfo(
            chosen,
            "replica" if plan else "memory",
            time.perf_counter() - t0,
            holder=mine.holder if mine else None,
            fetched=tuple(plan),
        )
        self._written.append(chosen)  # kept as one of this run's generations
        return info

    def _log_fallback(self, step: int, why: str) -> None:
        if self.rank == 0:
            log.warning(
                "memory tier: step %d not restored from memory (%s); using storage", step, why
            )

    def clear(self) -> None:
        """Delete this rank's snapshots and the replicas it received (not other ranks')."""
        self.wait()
        self.store.clear_rank(self.receive_from)

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Finish the memory save and replication in flight; stop the tier's worker."""
        self.wait()
        self._after.shutdown()
        self.checkpointer.close()
