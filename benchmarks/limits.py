"""Physical limits for the same state: the floors every method is compared to.

* memcpy_shm: copy_ into warm, preallocated shared-memory buffers (staging floor).
* raw_write_fsync: the tensor bytes written sequentially to one file + fsync
  (the 1-stream durable-write floor); its load is a cold read of that file
  (the 1-stream read floor). floors.py adds N streams and O_DIRECT; the best
  floor of a run is the fastest of them all.

Also the page-cache helpers the runner uses to make every load cold: a
per-file posix_fadvise(DONTNEED) after fsync (needs no root, unlike
/proc/sys/vm/drop_caches) and a mincore() probe to check that it worked.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.base import BenchContext, Done, Method, Pending
from benchmarks.state import iter_tensors


def _byte_view(t: torch.Tensor) -> memoryview:
    """Zero-copy uint8 view of a contiguous CPU tensor (0-d included)."""
    return memoryview(t.reshape(-1).numpy().view(np.uint8))


def fsync_dir(path: Path) -> None:
    """fsync a directory so a new entry in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return [p for p in sorted(path.rglob("*")) if p.is_file()]
    return [path] if path.exists() else []


def drop_page_cache(path: Path) -> None:
    """Evict a file's (or a directory tree's) clean pages from the page cache."""
    for f in _files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # DONTNEED only drops clean pages
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _resident_pages(f: Path) -> tuple[int, int]:
    size = f.stat().st_size
    if size == 0:
        return 0, 0
    npages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(f, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = (ctypes.c_ubyte * npages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(b & 1 for b in vec), npages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def page_cache_fraction(path: Path) -> float:
    """Fraction of a file's (or tree's) pages currently in the page cache."""
    resident = total = 0
    for f in _files(path):
        r, n = _resident_pages(f)
        resident += r
        total += n
    return resident / total if total else 0.0


def check_fadvise(directory: Path, nbytes: int = 16 << 20) -> dict[str, Any]:
    """Prove per-file cache dropping works here (fs, privileges) before trusting loads."""
    probe = directory / "fadvise-probe.bin"
    try:
        with open(probe, "wb") as f:
            f.write(os.urandom(nbytes))
            f.flush()
            os.fsync(f.fileno())
        before = page_cache_fraction(probe)
        drop_page_cache(probe)
        after = page_cache_fraction(probe)
    finally:
        probe.unlink(missing_ok=True)
    return {
        "resident_before": before,
        "resident_after": after,
        "works": after < 0.05,
        "euid": os.geteuid(),
    }


def _split_by_bytes(tensors: list[torch.Tensor], parts: int) -> list[list[int]]:
    """Greedy largest-first split of tensor indices into `parts` byte-balanced bins."""
    bins: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].nbytes)
    for i in order:
        b = load.index(min(load))
        bins[b].append(i)
        load[b] += tensors[i].nbytes
    return bins


class MemcpyShm(Method):
    """copy_ into warm shared-memory buffers with N threads (copy_ drops the GIL)."""

    durable = False
    priority = 0

    def resident_factor(self) -> float:
        return 1.0

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._dst: list[torch.Tensor] = []
        self._bins: list[list[int]] = []

    def setup(self, ctx: BenchContext) -> None:
        src = list(iter_tensors(ctx.state))
        self._dst = [torch.empty_like(t).share_memory_() for t in src]
        self._bins = _split_by_bytes(src, self.threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="memcpy")
        self._copy(src)  # warm: fault in every destination page before timing

    def _copy(self, src: list[torch.Tensor]) -> None:
        assert self._pool is not None

        def work(idx: list[int]) -> None:
            for i in idx:
                self._dst[i].copy_(src[i])

        for fut in [self._pool.submit(work, b) for b in self._bins]:
            fut.result()

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        self._copy(list(iter_tensors(state)))
        return Done()

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._dst = []


class RawWriteFsync(Method):
    """Tensor bytes -> one file, sequential write + fsync; load = cold readinto."""

    can_load = True
    priority = 0

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for t in iter_tensors(state):
                view = _byte_view(t)
                while view:  # write() may be short for huge buffers
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
        return Done()

    def load(self, ctx: BenchContext, path: Path) -> Any:
        out = list(iter_tensors(ctx.template()))
        with io.FileIO(path, "rb") as f:
            for t in out:
                view = _byte_view(t)
                while view:
                    n = f.readinto(view)
                    if not n:
                        raise EOFError(f"{path}: short read")
                    view = view[n:]
        return out

    def expected(self, state: dict[str, Any]) -> Any:
        # Raw bytes carry no structure or Python values: compare tensors only.
        return list(iter_tensors(state))

    def info(self) -> dict[str, Any]:
        return {"streams": 1, "direct": False}
