"""async_ckpt itself, as benchmarked methods.

* async_ckpt_save: synchronous ``async_ckpt.save`` / ``async_ckpt.load``.
* async_ckpt_async_process / _thread: one ``AsyncCheckpointer`` reused for
  every save, ``start(state)``-ed in setup (worker spawned, staging arenas
  reserved), so run 1 is the first save *after* start; the cost of start
  itself is in the JSON as ``info.start_s``.
* async_ckpt_async_staging: ``StagerOptions(async_staging=True)``: save()
  returns before the copy; ``fut.staged`` resolves when it is done.
* async_ckpt_async_parts: the same with ``wave_bytes=128MiB``: the worker
  writes each 128 MiB part while the next is copied.
* async_ckpt_budget25: ``max_staging_bytes`` = 25 % of the state, two
  buffers: staged and written in waves, the stall grows with the writes.
* async_ckpt_frozen90: ``skip_unchanged=True`` on a state where ~90 % of the
  tensor bytes are frozen (never written between saves); its stall is
  compared with ``async_ckpt_async_process`` (all tensors changed) of the
  same run.

Loads go through ``async_ckpt.load`` into the shared preallocated template,
with checksum verification on (the default), as a resume would.

For the process executor the worker's private memory is watched while each
save is in flight (RssAnon, every 20 ms) and its USS (psutil
``memory_full_info().uss``: pages private to it; the staging arena is shared
with this process, so it is not counted) is read after each commit;
``worker_uss_peak`` is the larger of the two.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psutil
import torch

import async_ckpt
from async_ckpt import AsyncCheckpointer, Stager, StagerOptions
from benchmarks.base import BenchContext, Done, FuturePending, Method, Pending
from benchmarks.metrics import now
from benchmarks.state import iter_tensors

ALL_CHANGED_REFERENCE = "async_ckpt_async_process"


def worker_uss(pid: int | None) -> int | None:
    """psutil's USS of a process: pages mapped by it alone (reads smaps_rollup).

    Costs tens of ms of kernel time for a worker mapping a 1 GiB arena (the
    kernel walks its page tables), so it is read once per save, after the commit.
    """
    if not pid:
        return None
    try:
        return psutil.Process(pid).memory_full_info().uss
    except psutil.Error:
        return None


def _rss_anon(pid: int) -> int | None:
    """Private anonymous memory of a process (/proc/PID/status RssAnon): O(1) to read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class UssSampler:
    """Peak private memory of the worker while a save is in flight.

    Samples RssAnon every 20 ms (cheap: the shared arena is shmem, not anon,
    so it is excluded like in USS); ``uss()`` adds psutil's USS, read once.
    """

    def __init__(self, pid: int | None, interval_s: float = 0.02) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        anon = _rss_anon(self.pid) if self.pid else None
        if anon is not None:
            self.peak_anon = max(self.peak_anon, anon)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> UssSampler:
        if self.pid:
            self.sample()
            self._thread = threading.Thread(target=self._loop, name="uss-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.sample()
        return self.peak_anon

    def uss(self) -> int | None:
        return worker_uss(self.pid)


class _OursPending(FuturePending):
    """FuturePending over a SaveFuture that samples the worker's USS until the commit.

    The sampler starts in wait_committed, outside the stall and staged
    windows (creating it reads /proc, which would otherwise count as stall).
    """

    def __init__(self, fut: async_ckpt.SaveFuture, pid: int | None) -> None:
        super().__init__(fut, fut.staged)  # type: ignore[arg-type]  # duck-typed futures
        self.fut = fut
        self.pid = pid
        self.sampler: UssSampler | None = None

    def wait_committed(self) -> None:
        if self.pid:
            self.sampler = UssSampler(self.pid).start()
        try:
            super().wait_committed()
        finally:
            if self.sampler is not None:
                self.sampler.stop()


class AsyncCkptSave(Method):
    """Synchronous async_ckpt.save (writes straight from tensor memory) + load."""

    can_load = True

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        async_ckpt.save(state, checkpoint_id=str(path), no_dist=True)
        return Done()

    def load(self, ctx: BenchContext, path: Path) -> Any:
        return ours_load(ctx, path)


def start_checkpointer(ckpt: AsyncCheckpointer, state: dict[str, Any] | None) -> bool:
    """ckpt.start(state) (worker + staging arenas); start() where the library predates
    the argument. Returns whether the arenas were reserved."""
    if state is not None:
        try:
            ckpt.start(state)  # type: ignore[call-arg]
            return True
        except TypeError:  # an async_ckpt without start(state_dict)
            pass
    ckpt.start()
    return False


def ours_load(ctx: BenchContext, path: Path) -> Any:
    target = ctx.template()
    result = async_ckpt.load(target, checkpoint_id=str(path))
    if result.missing_keys or result.unexpected_keys:
        raise AssertionError(f"load did not match: {result}")
    return target


class AsyncCkptAsync(Method):
    """One AsyncCheckpointer reused for every save (process or thread executor)."""

    is_async = True
    can_load = True
    parallel_setup = True  # start() waits for the worker to import torch

    def __init__(self, executor: str = "process", start: bool = True, **stager: Any) -> None:
        self.executor = executor
        self.do_start = start
        self.stager_options = StagerOptions(**stager)
        self.ckpt: AsyncCheckpointer | None = None
        self._stager: Stager | None = None
        self._start_s: float | None = None
        self._idle_uss: int | None = None
        self._reserved = False
        self._last: _OursPending | None = None

    def resident_factor(self) -> float:
        return float(self.stager_options.num_buffers)  # the arena(s), held between saves

    def setup(self, ctx: BenchContext) -> None:
        self._stager = Stager(self.stager_options)
        self.ckpt = AsyncCheckpointer(executor=self.executor, stager=self._stager, no_dist=True)  # type: ignore[arg-type]
        if self.do_start:
            t0 = now()
            self._reserved = start_checkpointer(self.ckpt, self.expected(ctx.state))
            self._start_s = now() - t0
            self._idle_uss = worker_uss(self.ckpt.worker_pid)

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        assert self.ckpt is not None
        fut = self.ckpt.save(state, checkpoint_id=str(path))
        self._last = _OursPending(fut, self.ckpt.worker_pid)
        return self._last

    def run_info(self) -> dict[str, Any]:
        """Per-save figures from SaveFuture.stats (called after the commit)."""
        if self._last is None:
            return {}
        st = self._last.fut.stats
        out: dict[str, Any] = {
            "lib_stall_s": st.stall_s,
            "lib_staged_s": st.staged_s,
            "plan_s": st.plan_s,
            "write_s": st.write_s,
            "lib_commit_s": st.commit_s,
            "copied_bytes": st.copied_bytes,
        }
        if self._last.sampler is not None:
            # Read after the commit, outside the timed region.
            out["worker_anon_peak"] = self._last.sampler.peak_anon
            out["worker_uss_after"] = self._last.sampler.uss()
            out["worker_uss_peak"] = max(out["worker_anon_peak"], out["worker_uss_after"] or 0)
        self._last = None
        return out

    def load(self, ctx: BenchContext, path: Path) -> Any:
        return ours_load(ctx, path)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "executor": self.executor,
            "stager_options": repr(self.stager_options),
            "started_in_setup": self.do_start,
            "arenas_reserved_at_start": self._reserved,
        }
        if self._start_s is not None:
            out["start_s"] = self._start_s
        if self._idle_uss is not None:
            out["worker_uss_idle"] = self._idle_uss
        if self._stager is not None:
            out["arenas_allocated"] = self._stager.arenas_allocated
        return out

    def teardown(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None


class AsyncCkptBudget(AsyncCkptAsync):
    """``max_staging_bytes`` = ``fraction`` of the state: staged and written in waves."""

    def __init__(self, fraction: float = 0.25, **kw: Any) -> None:
        super().__init__(num_buffers=2, **kw)
        self.fraction = fraction

    def resident_factor(self) -> float:
        return self.fraction

    def setup(self, ctx: BenchContext) -> None:
        total = sum(t.nbytes for t in iter_tensors(ctx.state))
        self.stager_options.max_staging_bytes = int(total * self.fraction)
        super().setup(ctx)


class AsyncCkptFrozen(AsyncCkptAsync):
    """skip_unchanged=True on a state whose tensors are ~`frozen` frozen (by bytes).

    The harness mutates every tensor of the shared state before each save; this
    method substitutes its own never-written copies for the frozen tensors, so
    exactly the unfrozen ~10 % change between saves (their ``_version`` moves).
    """

    def __init__(self, frozen: float = 0.9, **kw: Any) -> None:
        super().__init__(skip_unchanged=True, **kw)
        self.frozen = frozen
        self._copies: dict[int, torch.Tensor] = {}
        self._frozen_bytes = 0
        self._total_bytes = 0
        self._n_tensors = 0

    def resident_factor(self) -> float:
        return super().resident_factor() + self.frozen  # + the frozen copies

    def setup(self, ctx: BenchContext) -> None:
        tensors = list(iter_tensors(ctx.state))
        total = sum(t.nbytes for t in tensors)
        changing = 0
        seen = 0
        # Spread the changing tensors over the whole state: a tensor changes
        # whenever the changing share so far is below 1 - frozen.
        for i, t in enumerate(tensors):
            seen += t.nbytes
            if changing < (1 - self.frozen) * seen:
                changing += t.nbytes
            else:
                self._copies[i] = t.clone()
        self._frozen_bytes = total - changing
        self._total_bytes = total
        self._n_tensors = len(tensors)
        super().setup(ctx)

    def _substitute(self, obj: Any, counter: list[int]) -> Any:
        if isinstance(obj, torch.Tensor):
            i = counter[0]
            counter[0] += 1
            return self._copies.get(i, obj)
        if isinstance(obj, dict):
            return {k: self._substitute(v, counter) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._substitute(v, counter) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self._substitute(v, counter) for v in obj)
        return obj

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        return super().save(self._substitute(state, [0]), path)

    def expected(self, state: dict[str, Any]) -> Any:
        return self._substitute(state, [0])

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update(
            frozen_bytes_fraction=self._frozen_bytes / max(1, self._total_bytes),
            frozen_tensors=len(self._copies),
            tensors=self._n_tensors,
            all_changed_reference=ALL_CHANGED_REFERENCE,
        )
        return out

    def teardown(self) -> None:
        super().teardown()
        self._copies = {}
