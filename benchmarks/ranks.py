"""Run a function on several gloo ranks (processes on loopback) and collect results.

The one rank launcher of the repository: the multi-rank benchmarks use it,
and the tests through ``tests/dist_utils.py``. It lives here rather than in
``tests/`` because ``benchmarks`` is a package that both can import by name,
and the library itself ships neither.

Ranks start from a forkserver that has imported torch (and DTensor, and
async_ckpt) once per process: each rank is a fork of it, ready in tens of
milliseconds, where a spawned rank re-imports torch (seconds per rank, and
several ranks at once contend for the CPUs). The ranks are still fresh
processes with their own process group per call.
"""

from __future__ import annotations

import faulthandler
import os
import queue as queue_module
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

# What every rank imports anyway; loaded once in the forkserver, inherited by each fork.
# torch._dynamo: the first distribute_tensor() imports it (``torch._disable_dynamo``),
# seconds per rank.
PRELOAD = (
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "torch.distributed.device_mesh",
    "torch.distributed.tensor",
    "async_ckpt",
)


# Signal the launcher sends to a rank that has not reported in time: the rank
# writes every thread's stack to its file (faulthandler, so it works even when
# the rank's Python is blocked inside a C call), and the launcher puts the
# stacks in the error it raises.
DUMP_SIGNAL = signal.SIGUSR1


def _stack_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}.stacks")


def _entry(
    rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, queue: Any
) -> None:
    # the file stays open for the life of the process: faulthandler keeps its descriptor
    stacks = open(_stack_file(os.path.dirname(init_file), rank), "w")  # noqa: SIM115
    faulthandler.register(DUMP_SIGNAL, file=stacks, all_threads=True)
    faulthandler.enable(file=stacks, all_threads=True)  # a crash leaves its stacks there too
    os.environ["MASTER_ADDR"] = "127.0.0.1"  # async_ckpt's worker group binds to it
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        # No rank leaves before every rank has joined: gloo's init can return on one
        # rank while a peer is still connecting, and a rank whose ``fn`` returns at
        # once would close its connections under that peer ("Connection closed by peer").
        dist.barrier()
    except BaseException as exc:
        queue.put((rank, "error", f"joining the group: {type(exc).__name__}: {exc}"))
        return
    try:
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException as exc:  # reported to the parent, which raises it
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        dist.destroy_process_group()


def run_ranks(
    fn: Callable,
    world_size: int,
    *args: Any,
    timeout: float = 240,
    reporting: int | None = None,
    preload: Sequence[str] = PRELOAD,
) -> list[Any]:
    """``fn(rank, world_size, *args)`` on each rank; returns results by rank or raises.

    Each rank runs in its own process, in a gloo group of ``world_size`` ranks
    (file rendezvous in a temporary directory, ``MASTER_ADDR`` on loopback);
    ``fn`` and its results must pickle. Return plain Python values, not
    tensors: tensors travel through shared memory and can fail with EOFError
    once the rank has exited.

    ``timeout`` bounds the wait for each rank's report: only a rank that hangs
    reaches it, so callers make it generous (ranks and their workers share the
    CPUs of a busy machine).

    ``reporting`` is how many ranks are expected to report (fewer when a test
    kills a rank on purpose); missing ranks give None.

    ``preload`` names the modules the forkserver imports when it starts (the
    first call in this process; later calls share it).

    Raises RuntimeError naming every rank that raised, with its traceback;
    RuntimeError as soon as a rank's process dies without reporting (when all
    ranks are expected to report); TimeoutError when ``timeout`` passes with
    ranks still silent, carrying the stack of every thread of those ranks.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))  # no effect once the forkserver runs
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, init_file, fn, args, queue))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            reports = _collect(procs, queue, reporting, timeout, tmp)
        except BaseException:
            for p in procs:  # a lost or hung rank leaves its peers blocked on it
                p.kill()
            raise
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    if reports.errors:
        raise RuntimeError("\n".join(reports.errors))
    return [reports.results.get(r) for r in range(world_size)]


class _Reports:
    """What the ranks reported so far: results by rank, and the errors of those that raised."""

    def __init__(self) -> None:
        self.results: dict[int, Any] = {}
        self.errors: list[str] = []
        self.reported: set[int] = set()

    def add(self, report: tuple[int, str, Any]) -> None:
        rank, status, value = report
        self.reported.add(rank)
        if status == "ok":
            self.results[rank] = value
        else:
            self.errors.append(f"rank {rank}: {value}")


def _collect(
    procs: list[Any], queue: Any, reporting: int | None, timeout: float, directory: str
) -> _Reports:
    """Wait for the ranks' reports; raise on a death or a hang."""
    reports = _Reports()
    expected = len(procs) if reporting is None else reporting
    deadline = time.monotonic() + timeout
    while len(reports.reported) < expected:
        try:
            reports.add(queue.get(timeout=max(0.0, min(1.0, deadline - time.monotonic()))))
        except queue_module.Empty:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    _hang_report(procs, reports.reported, timeout, directory)
                ) from None
            if reporting is None:
                _raise_on_silent_death(procs, reports, queue, directory)
    return reports


def _raise_on_silent_death(procs: list[Any], reports: _Reports, queue: Any, directory: str) -> None:
    """A rank that exited without a report will never send one: fail now, not at the timeout.

    Its report may still be in the pipe (a rank puts it, then exits), so the
    queue is drained for a moment before the rank is declared lost.
    """
    dead = [r for r, p in enumerate(procs) if r not in reports.reported and p.exitcode is not None]
    if not dead:
        return
    drain_until = time.monotonic() + 5.0
    while time.monotonic() < drain_until and any(r not in reports.reported for r in dead):
        try:
            reports.add(queue.get(timeout=0.5))
        except queue_module.Empty:
            continue
    lost = [r for r in dead if r not in reports.reported]
    if lost:
        codes = ", ".join(f"rank {r}: exit code {procs[r].exitcode}" for r in lost)
        stacks = [f"--- rank {r} ---\n{_read_stacks(directory, r)}" for r in lost]
        raise RuntimeError(
            "\n".join([f"rank process died without reporting ({codes})", *stacks, *reports.errors])
        )


def _hang_report(procs: list[Any], reported: set[int], timeout: float, directory: str) -> str:
    """Every silent rank's thread stacks, asked for with :data:`DUMP_SIGNAL`."""
    silent = [r for r in range(len(procs)) if r not in reported]
    for r in silent:
        if procs[r].is_alive():
            os.kill(procs[r].pid, DUMP_SIGNAL)
    lines = [f"ranks {silent} did not report within {timeout:.0f} s"]
    for r in silent:
        stacks = ""
        for _ in range(20):  # the dump is written by the rank asynchronously
            time.sleep(0.1)
            stacks = _read_stacks(directory, r)
            if stacks != NO_STACKS:
                break
        state = "alive" if procs[r].is_alive() else f"exit code {procs[r].exitcode}"
        lines.append(f"--- rank {r} ({state}) ---\n{stacks}")
    return "\n".join(lines)


NO_STACKS = "(no stacks written)"


def _read_stacks(directory: str, rank: int) -> str:
    path = _stack_file(directory, rank)
    if not os.path.exists(path):
        return NO_STACKS
    with open(path) as f:
        return f.read().strip() or NO_STACKS
