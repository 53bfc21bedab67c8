"""Run a function on several gloo ranks (processes on loopback) and collect results.

Ranks start from a forkserver that has imported torch (and DTensor, and
async_ckpt) once per test session: each rank is a fork of it, ready in tens
of milliseconds, where a spawned rank re-imports torch (seconds per rank, and
several ranks at once contend for the CPUs). The ranks are still fresh
processes with their own process group per call.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

# What every rank imports anyway; loaded once in the forkserver, inherited by each fork.
# torch._dynamo: the first distribute_tensor() imports it (``torch._disable_dynamo``),
# seconds per rank.
_PRELOAD = [
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "torch.distributed.device_mesh",
    "torch.distributed.tensor",
    "async_ckpt",
    "pytest",
]


def _entry(
    rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, queue: Any
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException as exc:  # reported to the parent, which fails the test
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        dist.destroy_process_group()


def run_ranks(
    fn: Callable, world_size: int, *args: Any, timeout: float = 240, reporting: int | None = None
) -> list[Any]:
    """``fn(rank, world_size, *args)`` on each rank; returns results by rank or raises.

    ``timeout`` bounds the wait for each rank's report: only a rank that hangs reaches
    it, so it is generous (ranks and their workers share the CPUs of a busy machine).

    ``reporting`` is how many ranks are expected to report (fewer when a test
    kills a rank on purpose); missing ranks give None.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # no effect once the forkserver runs
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, init_file, fn, args, queue))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors = []
        try:
            for _ in range(world_size if reporting is None else reporting):
                rank, status, value = queue.get(timeout=timeout)
                if status == "ok":
                    results[rank] = value
                else:
                    errors.append(f"rank {rank}: {value}")
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results.get(r) for r in range(world_size)]
