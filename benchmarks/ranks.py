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

import os
import tempfile
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


def _entry(
    rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, queue: Any
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"  # async_ckpt's worker group binds to it
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
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

    Raises RuntimeError naming every rank that raised, with its traceback.
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
        raise RuntimeError("\n".join(errors))
    return [results.get(r) for r in range(world_size)]
