"""The one place where benchmarked methods are registered.

Add a method: implement benchmarks.base.Method in a module of your own and add
one line to REGISTRY below, e.g.

    from benchmarks.mine import MyMethod
    REGISTRY["my_method"] = lambda: MyMethod(threads=2)

Factories are called once per size, so each gets fresh buffers and pools.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from benchmarks.base import Method
from benchmarks.floors import StreamWriteFloor
from benchmarks.limits import MemcpyShm, RawWriteFsync
from benchmarks.ours import AsyncCkptAsync, AsyncCkptBudget, AsyncCkptFrozen, AsyncCkptSave
from benchmarks.peers import DcpAsync, DcpSave, TorchSave, best_staging
from benchmarks.peers_ext import available_peers

Factory = Callable[[], Method]

# Names of the limits the runner divides by; keep them registered.
WRITE_FLOOR = "raw_write_fsync"  # the 1-stream floor: "commit / 1-stream floor"
COPY_FLOOR = "memcpy_shm"


def _stream_floors() -> dict[str, Factory]:
    """raw_write_fsync_{2,4,8}streams, raw_write_fsync_direct_{1stream,2,4,8streams}."""
    out: dict[str, Factory] = {}
    for direct in (False, True):
        for n in (1, 2, 4, 8):
            if n == 1 and not direct:
                continue  # that is raw_write_fsync itself
            name = f"raw_write_fsync_{'direct_' if direct else ''}{n}stream{'s' if n > 1 else ''}"
            out[name] = lambda n=n, direct=direct: StreamWriteFloor(n, direct=direct)
    return out


STREAM_FLOORS = _stream_floors()
DIRECT_FLOORS = [n for n in STREAM_FLOORS if n.startswith("raw_write_fsync_direct_")]
# The variants whose lowest median is the best write (commit) / read (load) floor.
FLOOR_VARIANTS: list[str] = [WRITE_FLOOR, *STREAM_FLOORS]

REGISTRY: dict[str, Factory] = {
    # physical limits
    COPY_FLOOR: lambda: MemcpyShm(threads=2),
    WRITE_FLOOR: lambda: RawWriteFsync(),
    **STREAM_FLOORS,  # N streams, buffered and O_DIRECT: the best floors (floors.py)
    # peers
    "torch_save": lambda: TorchSave(),
    "dcp_save": lambda: DcpSave(),
    "dcp_async_thread": lambda: DcpAsync(AsyncCheckpointerType.THREAD),
    "dcp_async_process": lambda: DcpAsync(AsyncCheckpointerType.PROCESS),
    "dcp_async_process_best": lambda: DcpAsync(AsyncCheckpointerType.PROCESS, best_staging()),
    # third-party peers (benchmarks/peers_ext.py, extra `peers`), only where they run:
    # nvrx_async, torchsnapshot_async, torchsnapshot_async_fsync
    **available_peers(),
    # async_ckpt (benchmarks/ours.py)
    "async_ckpt_save": lambda: AsyncCkptSave(),
    "async_ckpt_async_process": lambda: AsyncCkptAsync("process"),
    "async_ckpt_async_thread": lambda: AsyncCkptAsync("thread"),
    "async_ckpt_async_staging": lambda: AsyncCkptAsync("process", async_staging=True),
    "async_ckpt_async_parts": lambda: AsyncCkptAsync(
        "process", async_staging=True, wave_bytes=128 << 20
    ),
    "async_ckpt_budget25": lambda: AsyncCkptBudget(0.25, executor="process"),
    "async_ckpt_frozen90": lambda: AsyncCkptFrozen(0.9, executor="process"),
}


def select(spec: str) -> list[str]:
    """'all', 'none', 'floors' or a comma list of registered names (order kept) -> names."""
    if spec.strip() == "all":
        return list(REGISTRY)
    if spec.strip() == "none":  # e.g. only the multi-rank runs
        return []
    if spec.strip() == "floors":  # every write/read floor variant, nothing else
        return list(FLOOR_VARIANTS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(REGISTRY)}")
    return names


def create(name: str) -> Method:
    method = REGISTRY[name]()
    method.name = name
    return method
