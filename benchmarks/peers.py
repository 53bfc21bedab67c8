"""What users have today: torch.save/torch.load and torch.distributed.checkpoint.

DCP's async_save (torch 2.13) accepts `async_checkpointer_type` (THREAD or
PROCESS) and `async_stager`; with an async stager it returns an
AsyncSaveResponse(staging_completion, upload_completion), otherwise a plain
Future. PROCESS mode spawns one daemon process per interpreter (module global
`_CHECKPOINT_PROCESS`) and needs an initialised default process group to
bootstrap it, even with no_dist=True.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

from benchmarks.base import BenchContext, Done, FuturePending, Method, Pending, remove_path
from benchmarks.limits import fsync_dir

# DCP warns on every no_dist call; that is the intent here, so silence it.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def ensure_process_group() -> None:
    """Init a 1-rank gloo group on a free loopback port (PROCESS mode needs one)."""
    if dist.is_initialized():
        return
    # The DCP daemon reads MASTER_ADDR; without it it resolves the FQDN, which
    # can be slow or unresolvable in containers.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)  # port 0: any free
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)


def start_dcp_daemon(scratch: Path) -> float:
    """Spawn DCP's PROCESS-mode daemon now; return seconds taken (0 if running).

    The daemon configures INFO logging to stderr (three lines per save), so it
    is spawned with fd 2 pointing at scratch/dcp-daemon.log; it keeps that fd.
    """
    from torch.distributed.checkpoint import _async_process_executor as ape

    if ape._CHECKPOINT_PROCESS is not None:
        return 0.0
    ensure_process_group()
    warm = scratch / "dcp-daemon-warmup"
    log_path = scratch / "dcp-daemon.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(log_fd, 2)
    try:
        t0 = time.perf_counter()
        dcp.async_save(
            {"warmup": torch.zeros(1)},
            checkpoint_id=str(warm),
            async_checkpointer_type=AsyncCheckpointerType.PROCESS,
            no_dist=True,
        ).result()
        return time.perf_counter() - t0
    except Exception:
        # The daemon's own traceback went to the log; surface it with ours.
        os.dup2(saved, 2)
        print(f"DCP daemon log:\n{log_path.read_text(errors='replace')[-4000:]}", file=sys.stderr)
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(log_fd)
        remove_path(warm)


def shutdown_dcp() -> None:
    """Stop DCP's PROCESS-mode daemon and the process group (call once at exit)."""
    from torch.distributed.checkpoint import _async_process_executor as ape

    proc = ape._CHECKPOINT_PROCESS
    if proc is not None:
        ape._CHECKPOINT_PROCESS = None
        try:
            proc.__del__()  # sends TERMINATE and joins 5 s; private API, best effort
        except OSError:  # the daemon is gone already (broken pipe)
            pass
        # Wait it out, so that the garbage collector's own __del__ finds it dead
        # and does not write TERMINATE into a closed pipe at exit.
        proc._save_process.join(timeout=30)
        if proc._save_process.is_alive():
            proc._save_process.kill()
            proc._save_process.join()
    if dist.is_initialized():
        dist.destroy_process_group()


def dcp_pending(resp: Any) -> Pending:
    """What dcp.async_save returned, as a Pending: an AsyncSaveResponse (staging and
    upload futures) when a stager is given, otherwise a single Future."""
    if isinstance(resp, AsyncSaveResponse):
        return FuturePending(resp.upload_completion, resp.staging_completion)
    assert isinstance(resp, Future)
    return FuturePending(resp)


class TorchSave(Method):
    """torch.save to one file + fsync; load = torch.load (weights_only)."""

    can_load = True
    priority = 2

    def transient_factor(self) -> float:
        return 1.0  # torch.load allocates a fresh state

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(path.parent)
        return Done()

    def load(self, ctx: BenchContext, path: Path) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True)


class DcpSave(Method):
    """Synchronous dcp.save (FileSystemWriter defaults: 1 thread, fsync on)."""

    can_load = True
    priority = 2

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
        return Done()

    def load(self, ctx: BenchContext, path: Path) -> Any:
        return dcp_load(ctx, path)


def dcp_load(ctx: BenchContext, path: Path) -> Any:
    # DCP loads in place into a preallocated state dict, like a resume would.
    target = ctx.template()
    dcp.load(target, checkpoint_id=str(path), no_dist=True)
    return target


class DcpAsync(Method):
    """dcp.async_save with a chosen executor and, optionally, a reused stager."""

    is_async = True
    can_load = True  # same format as dcp_save; loaded to check the snapshot is exact
    priority = 2

    def resident_factor(self) -> float:
        return 1.0 if self.staging is not None else 0.0  # the reused stager's buffers

    def transient_factor(self) -> float:
        # Default staging copies into fresh memory per save; PROCESS mode also
        # moves the copy into shared memory for the daemon (~1.7x seen at 1 GiB).
        if self.staging is not None:
            return 0.5
        return 2.0 if self.mode == AsyncCheckpointerType.PROCESS else 1.0

    def __init__(
        self,
        mode: AsyncCheckpointerType = AsyncCheckpointerType.THREAD,
        staging: StagingOptions | None = None,
    ) -> None:
        self.mode = mode
        self.staging = staging  # None: DCP's default (a fresh stager per save)
        self.needs_process_group = mode == AsyncCheckpointerType.PROCESS
        self._stager: DefaultStager | None = None
        self._daemon_start_s: float | None = None

    def setup(self, ctx: BenchContext) -> None:
        if self.needs_process_group:
            # Spawned here, not in run 1, so its cost is reported on its own.
            self._daemon_start_s = start_dcp_daemon(ctx.root.parent)
        if self.staging is not None:
            # Reused across saves so its shared-memory staging buffers stay warm.
            self._stager = DefaultStager(self.staging)

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        resp = dcp.async_save(
            state,
            checkpoint_id=str(path),
            async_checkpointer_type=self.mode,
            async_stager=self._stager,
            no_dist=True,
        )
        return dcp_pending(resp)

    def load(self, ctx: BenchContext, path: Path) -> Any:
        return dcp_load(ctx, path)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode.value, "staging": repr(self.staging)}
        if self._daemon_start_s:
            out["daemon_start_s"] = self._daemon_start_s
        return out

    def teardown(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None


def best_staging() -> StagingOptions:
    """DCP's fastest CPU-only staging: async, into reused shared memory.

    Pinned memory and non-blocking copies need an accelerator (the latter
    raises without one), so both are off on a CPU-only box.
    """
    return StagingOptions(
        use_pinned_memory=False,
        use_shared_memory=True,
        use_async_staging=True,
        use_non_blocking_copy=False,
    )
