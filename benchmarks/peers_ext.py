"""Third-party async checkpointers beside DCP: NVIDIA's nvidia-resiliency-ext and torchsnapshot.

Optional (the `peers` extra: ``pip install -c constraints.txt -e '.[peers]'``).
Only the peers that can run here are registered (:func:`available_peers`); the
others, and why, are in :func:`unavailable_peers`. Each Method also says why it
cannot run (``skip_reason()``), and its setup() raises with that reason rather
than hanging.

nvrx_async: nvidia-resiliency-ext 0.4.1 (``nvidia_resiliency_ext.checkpointing.async_ckpt``)
    Its DCP-format path as Megatron-style trainers use it: a new
    ``FileSystemWriterAsync`` per save (``thread_count=2``), planned with
    ``save_state_dict_async_plan``, and an ``AsyncRequest`` handed to one
    ``AsyncCallsQueue(persistent=True)``: a persistent worker (spawned once, in
    setup) that receives the request through a ``torch.multiprocessing`` queue,
    so CPU tensors reach it through shared memory: their storages are moved into
    shared memory in place by the pickling, no copy per save (so from its first
    save on, the runner's live state is in shared memory, for the other methods
    too; that one-off move is inside nvrx_async's first run). The worker runs the
    request's ``preload_fn`` while the trainer waits (``schedule_async_request``
    returns only then), then forks ``thread_count`` writers, one file each, each
    fsync'd. The trainer finalizes with ``save_state_dict_async_finalize`` (gather,
    ``.metadata`` written and fsync'd by torch's ``FileSystemWriter.finish``);
    ``wait_committed`` returns after that. Load: ``dcp.load`` (the same format).

    Where it needs CUDA (0.4.1, read in its source and run on a CPU-only torch):

    * ``FileSystemWriterAsync.preload_tensors``, the ``preload_fn`` that
      ``get_save_function_and_args`` returns, calls ``torch.cuda.synchronize()``
      (``non_blocking=True`` is hard-wired): "AssertionError: Torch not compiled
      with CUDA enabled". In the persistent worker that exception ends the
      worker's loop and the trainer then waits forever in
      ``schedule_async_request`` (``preload_q.join()``). Even with CUDA it would
      not snapshot a CPU state: ``tensor.to("cpu")`` of a CPU tensor is the
      tensor itself, so the worker would write memory the trainer is mutating.
      Here it is replaced by :func:`cpu_preload`, which does on the CPU what it
      does on a GPU: the worker copies the tensors into its own memory while the
      trainer waits.
    * ``TemporalAsyncCaller.schedule_async_call`` (``persistent=False``, the
      fork-per-save mode) calls ``torch.cuda.synchronize()`` unconditionally.
    * ``TorchAsyncCheckpoint.async_save`` (its ``torch.save`` wrapper) calls
      ``torch.cuda.synchronize()`` unconditionally.
    * ``AsyncCaller.sync_all_async_calls`` and
      ``AsyncRequest.execute_finalize_fns(validate_matching_call_idx=True)``
      all-reduce a tensor on ``torch.cuda.current_device()``: every
      ``maybe_finalize_async_calls`` here passes ``no_dist=True``, and
      ``AsyncCallsQueue.close()`` (which passes ``no_dist=False``) is only called
      with nothing left to finalize.
    * ``verify_global_md_reuse`` builds a ``device='cuda'`` tensor when a
      loaded checkpoint's metadata is reused (``enable_cache`` with
      ``init_checkpoint_metadata_cache``): not used here.

    It also needs an initialised process group (``torch.distributed.get_rank()``
    in the caller and the writer): a 1-rank gloo group, as DCP's PROCESS mode.

torchsnapshot_async / torchsnapshot_async_fsync: torchsnapshot 0.1.0, ``Snapshot.async_take``
    The state is one stateful entry of the app state. ``async_take`` returns once
    every tensor is staged (CPU tensors smaller than its 128 MiB slab threshold
    are copied into slabs; the bench state's largest tensor is 64 MiB) and a
    background thread writes the files and ``.snapshot_metadata``.
    **torchsnapshot never fsyncs** (its file-system plugin writes with
    aiofiles and closes), so ``torchsnapshot_async``'s "commit" is when the
    bytes reach the page cache, not the disk: not comparable with the others'.
    ``torchsnapshot_async_fsync`` then fsyncs every file and directory it wrote
    (timed inside commit, also reported alone as ``fsync_s``), which makes it
    comparable. Load: ``Snapshot.restore`` into the preallocated template
    (in place, like DCP's).

    Beware (0.1.0): its ``_should_copy_cpu_tensor`` compares the serializer
    string with an Enum member, so a CPU tensor is never copied by its own
    stager; only batching into slabs copies it. A CPU tensor at or above the
    slab threshold (TORCHSNAPSHOT_SLAB_SIZE_THRESHOLD_BYTES_OVERRIDE) is written
    from the live tensor after ``async_take`` returned, so a training step that
    mutates it in the meantime corrupts the snapshot (the runner's load check
    would report it).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.base import BenchContext, Method, Pending, remove_path
from benchmarks.limits import fsync_dir
from benchmarks.metrics import now
from benchmarks.peers import dcp_load, ensure_process_group

Factory = Callable[[], Method]

# How often wait_committed asks NVRx whether the worker is done (it has no
# blocking wait without CUDA: its blocking path polls every 100 ms).
_NVRX_POLL_S = 0.002


def _missing(module: str, dist: str) -> str | None:
    """None if `module` imports, else why not (with the install hint)."""
    try:
        __import__(module)
    except Exception as e:  # ImportError, or a broken install failing at import
        return f"{dist} not installed ({type(e).__name__}: {e}); pip install -e '.[peers]'"
    return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# -- nvidia-resiliency-ext ----------------------------------------------------


def cpu_preload(write_buckets: list[Any]) -> list[Any]:
    """NVRx's ``preload_fn`` for CPU tensors; runs in its persistent worker.

    Same contract as ``FileSystemWriterAsync.preload_tensors`` (returns the
    buckets with their tensors replaced by copies in this process's memory; the
    trainer resumes once it returns) without its ``torch.cuda.synchronize()``.
    The tensors arrive as shared memory (the trainer's own storages), so the copy
    is what makes the checkpoint a snapshot.

    Never raises: an exception here would end NVRx's worker loop before it
    releases the waiting trainer (a hang). On error it prints the traceback and
    returns no buckets, so that the finalization fails with "Incomplete worker
    results" instead.
    """
    try:
        out = []
        for file_name, storage_key, (bytes_data, tensor_data) in write_buckets:
            copies = [(item, t.detach().clone()) for item, t in tensor_data]
            out.append((file_name, storage_key, (bytes_data, copies)))
        return out
    except Exception:
        print(f"nvrx_async: cpu_preload failed\n{traceback.format_exc()}", file=sys.stderr)
        return []


class NvrxPending(Pending):
    """save() returned after the worker's copy; commit = NVRx finalized the call."""

    def __init__(self, method: NvrxAsync, call_idx: int) -> None:
        self._method = method
        self._idx = call_idx

    def wait_committed(self) -> None:
        self._method._wait_finalized(self._idx)


class NvrxAsync(Method):
    """nvidia-resiliency-ext's persistent async worker, DCP format, CPU shared memory.

    See the module docstring for what runs where, and where NVRx needs CUDA.
    """

    is_async = True
    can_load = True
    needs_process_group = True
    priority = 2

    def __init__(self, thread_count: int = 2) -> None:
        self.thread_count = thread_count  # writer processes (= files) per save; NVRx's example: 2
        self._queue: Any = None
        self._start_s: float | None = None

    @staticmethod
    def skip_reason() -> str | None:
        """Why this cannot run here, or None."""
        return _missing("nvidia_resiliency_ext.checkpointing.async_ckpt.filesystem_async", NVRX)

    def transient_factor(self) -> float:
        return 1.0  # the worker's private copy of every tensor, freed after the write

    def setup(self, ctx: BenchContext) -> None:
        reason = self.skip_reason()
        if reason:
            raise RuntimeError(f"skipped: {reason}")
        from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncCallsQueue

        ensure_process_group()
        self._queue = AsyncCallsQueue(persistent=True)
        # Spawn the worker (and NVRx's results Manager process) now, so that their
        # start-up is reported on its own (info.start_s), not in run 1.
        warm = ctx.root.parent / "nvrx-warmup"
        t0 = now()
        try:
            import torch

            self.save({"warmup": torch.zeros(1)}, warm).wait_committed()
        finally:
            remove_path(warm)
        self._start_s = now() - t0

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncRequest
        from nvidia_resiliency_ext.checkpointing.async_ckpt.filesystem_async import (
            FileSystemWriterAsync,
        )
        from nvidia_resiliency_ext.checkpointing.async_ckpt.state_dict_saver import (
            save_state_dict_async_finalize,
            save_state_dict_async_plan,
        )

        writer = FileSystemWriterAsync(str(path), thread_count=self.thread_count)
        planned = save_state_dict_async_plan(state, writer, None, 0)
        save_fn, _cuda_preload, save_args = writer.get_save_function_and_args()
        request = AsyncRequest(
            save_fn,
            save_args,
            [partial(save_state_dict_async_finalize, *planned)],
            preload_fn=partial(cpu_preload, writer.write_buckets),
        )
        if self._queue.persistent_caller is not None and not self._worker_alive():
            self._worker_died()  # scheduling would wait forever for its preload
        # Blocks until the worker has run cpu_preload (NVRx's preload_q.join()).
        idx = self._queue.schedule_async_request(request)
        return NvrxPending(self, idx)

    def _worker_alive(self) -> bool:
        caller = self._queue.persistent_caller
        return caller is not None and caller.process is not None and caller.process.is_alive()

    def _pending_idx(self) -> set[int]:
        # Not the indices maybe_finalize_async_calls returns: 0.4.1 returns the
        # call_idx of the request it kept, which is always 0 (set only on the copy
        # it sent to the worker).
        return {call.idx for call in self._queue.async_calls}

    def _wait_finalized(self, idx: int) -> None:
        while idx in self._pending_idx():
            # no_dist=True: NVRx's distributed check all-reduces a CUDA tensor.
            self._queue.maybe_finalize_async_calls(blocking=False, no_dist=True)
            if idx not in self._pending_idx():
                break
            if not self._worker_alive():
                self._worker_died()
            time.sleep(_NVRX_POLL_S)

    def _worker_died(self) -> None:
        caller = self._queue.persistent_caller
        code = caller.process.exitcode if caller.process is not None else None
        # Forget it: NVRx's close() (also run by its __del__) would wait forever
        # for a dead worker to take the DONE message.
        caller.process = None
        self._queue.async_calls.clear()
        raise RuntimeError(
            f"nvidia-resiliency-ext's checkpoint worker died (exit code {code}; see its stderr)"
        )

    def load(self, ctx: BenchContext, path: Path) -> Any:
        return dcp_load(ctx, path)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": _version(NVRX),
            "thread_count": self.thread_count,
            "persistent": True,
            "preload": "cpu_preload (worker copies from shared memory)",
        }
        if self._start_s is not None:
            out["start_s"] = self._start_s
        return out

    def teardown(self) -> None:
        queue, self._queue = self._queue, None
        if queue is None:
            return
        caller = queue.persistent_caller
        if caller is not None and caller.process is not None and caller.process.is_alive():
            queue.maybe_finalize_async_calls(blocking=True, no_dist=True)
            caller.close()  # sends DONE and joins
        elif caller is not None:
            caller.process = None  # dead: its close() would wait forever for the DONE to be taken
        queue.async_calls.clear()


# -- torchsnapshot ------------------------------------------------------------


class _Holder:
    """The whole state as one torchsnapshot Stateful (state_dict/load_state_dict)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then every directory (deepest first) and root's parent."""
    dirs = [root]
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)
    fsync_dir(root.parent)


class SnapshotPending(Pending):
    """save() returned after staging; commit = the writer thread is done (+ fsync)."""

    def __init__(self, method: TorchsnapshotAsync, pending: Any, path: Path) -> None:
        self._method = method
        self._pending = pending
        self._path = path

    def wait_committed(self) -> None:
        self._pending.wait()  # raises RuntimeError with the writer's traceback
        if self._method.fsync:
            t0 = now()
            fsync_tree(self._path)
            self._method._fsync_s = now() - t0


class TorchsnapshotAsync(Method):
    """torchsnapshot's ``Snapshot.async_take``; ``fsync=True`` adds the fsync it lacks.

    torchsnapshot does not fsync: without ``fsync`` its commit time is not
    comparable with the other methods' (see the module docstring).
    """

    is_async = True
    can_load = True
    needs_process_group = True
    priority = 2

    def __init__(self, fsync: bool = False) -> None:
        self.fsync = fsync
        self.durable = fsync  # without it the bytes may be in the page cache only
        self._fsync_s: float | None = None

    @staticmethod
    def skip_reason() -> str | None:
        """Why this cannot run here, or None."""
        return _missing("torchsnapshot", TORCHSNAPSHOT)

    def transient_factor(self) -> float:
        return 1.0  # the slabs holding a copy of every tensor until written

    def setup(self, ctx: BenchContext) -> None:
        reason = self.skip_reason()
        if reason:
            raise RuntimeError(f"skipped: {reason}")
        # Its background commit uses the default group's store; without a group it
        # would start a TCPStore on socket.gethostname().
        ensure_process_group()

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        from torchsnapshot import Snapshot

        pending = Snapshot.async_take(str(path), {"state": _Holder(state)})
        return SnapshotPending(self, pending, path)

    def load(self, ctx: BenchContext, path: Path) -> Any:
        from torchsnapshot import Snapshot

        holder = _Holder(ctx.template())  # restore reads into these tensors in place
        Snapshot(str(path)).restore({"state": holder})
        return holder.loaded

    def info(self) -> dict[str, Any]:
        return {"version": _version(TORCHSNAPSHOT), "fsync": self.fsync}

    def run_info(self) -> dict[str, Any]:
        out, self._fsync_s = self._fsync_s, None
        return {} if out is None else {"fsync_s": out}


# -- registry -----------------------------------------------------------------

NVRX = "nvidia-resiliency-ext"
TORCHSNAPSHOT = "torchsnapshot"

PEERS: dict[str, Factory] = {
    "nvrx_async": lambda: NvrxAsync(),
    "torchsnapshot_async": lambda: TorchsnapshotAsync(fsync=False),
    "torchsnapshot_async_fsync": lambda: TorchsnapshotAsync(fsync=True),
}


def _reason(factory: Factory) -> str | None:
    method = factory()  # constructors are cheap: no import, no allocation
    return method.skip_reason()  # type: ignore[attr-defined]


def available_peers() -> dict[str, Factory]:
    """The peers that can run here, for benchmarks/methods.py's REGISTRY."""
    return {name: f for name, f in PEERS.items() if _reason(f) is None}


def unavailable_peers() -> dict[str, str]:
    """The peers that cannot run here, and why (for the runner to report as skipped)."""
    out = {name: _reason(f) for name, f in PEERS.items()}
    return {name: why for name, why in out.items() if why is not None}
