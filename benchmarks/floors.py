"""The best write and cold-read floors of this machine, measured in the same run.

`raw_write_fsync` (limits.py) is one stream: one file, one thread, buffered.
A disk often serves several streams, or `O_DIRECT` writes, faster than one
buffered stream, so a library that writes 4 files in parallel can beat
"1.0x" of that floor. The variants here split the tensor bytes into N
contiguous ranges (cut at 4 KiB boundaries of the concatenated bytes, so every
stream gets the same share whatever the tensor sizes) and write range i to
file i from thread i:

* buffered: `write()` straight from tensor memory;
* direct: `O_DIRECT` through a page-aligned anonymous-mmap bounce buffer per
  stream (the copy into it releases the GIL); the unaligned tail is written
  padded to 4 KiB and the file truncated back to its length.

Each save ends with fsync of every file (in its own thread), then of the
checkpoint directory and its parent. Each load is the matching N-stream cold
read (buffered `readinto`, or `O_DIRECT` reads through the same bounce
buffers). The best floor of a size is the lowest median over the variants
that ran (see `best_floors`); which one won is recorded.
"""

from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.base import BenchContext, Done, Method, Pending
from benchmarks.limits import fsync_dir
from benchmarks.state import iter_tensors

ALIGN = 4096  # O_DIRECT alignment of buffers, offsets and lengths (covers 512 B sectors)
CHUNK = 8 << 20  # bytes per O_DIRECT request (the bounce buffer's size at most)

Segment = tuple[int, int, int]  # (tensor index, first byte, end byte)


def _round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def stream_segments(sizes: list[int], streams: int) -> list[list[Segment]]:
    """Cut the concatenated tensor bytes into `streams` contiguous ranges.

    Cuts fall on ALIGN boundaries of the concatenation; a range may start or
    end inside a tensor. Returns, per stream, the tensor byte ranges it covers.
    """
    total = sum(sizes)
    cuts = [min(total, _round_up(total * i // streams)) for i in range(streams)] + [total]
    out: list[list[Segment]] = [[] for _ in range(streams)]
    start = 0
    for idx, size in enumerate(sizes):
        end = start + size
        for s in range(streams):
            lo, hi = max(start, cuts[s]), min(end, cuts[s + 1])
            if lo < hi:
                out[s].append((idx, lo - start, hi - start))
        start = end
    return out


def _u8(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Flat uint8 views (zero-copy) of contiguous CPU tensors, 0-d included."""
    return [t.reshape(-1).view(torch.uint8) for t in tensors]


def _parts(tensors: list[torch.Tensor], segments: list[Segment]) -> list[torch.Tensor]:
    u8 = _u8(tensors)
    return [u8[i][lo:hi] for i, lo, hi in segments]


def _write_all(fd: int, view: memoryview) -> None:
    while view:  # write() may be short for huge buffers
        view = view[os.write(fd, view) :]


class _Bounce:
    """A page-aligned anonymous mapping, as a memoryview and as a uint8 tensor."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._map = mmap.mmap(-1, size)
        self.view = memoryview(self._map)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.tensor.zero_()  # fault every page in outside the timed region

    def close(self) -> None:
        del self.tensor
        self.view.release()
        self._map.close()


def _write_direct(fd: int, parts: list[torch.Tensor], bounce: _Bounce) -> int:
    """Copy parts through the bounce buffer, writing it out whenever it is full."""
    fill = length = 0
    for p in parts:
        off, n = 0, p.numel()
        while off < n:
            k = min(bounce.size - fill, n - off)
            bounce.tensor[fill : fill + k].copy_(p[off : off + k])  # releases the GIL
            fill, off, length = fill + k, off + k, length + k
            if fill == bounce.size:
                _write_all(fd, bounce.view)
                fill = 0
    if fill:  # the tail, padded to ALIGN; the file is truncated back below
        padded = _round_up(fill)
        bounce.tensor[fill:padded].zero_()
        _write_all(fd, bounce.view[:padded])
        os.ftruncate(fd, length)
    return length


def _read_direct(fd: int, parts: list[torch.Tensor], bounce: _Bounce, path: Path) -> None:
    """O_DIRECT reads into the bounce buffer, each scattered into the parts."""
    length = sum(p.numel() for p in parts)
    pos = pi = poff = 0
    while pos < length:
        want = min(bounce.size, _round_up(length - pos))
        got = min(os.readv(fd, [bounce.view[:want]]), length - pos)
        if got < min(want, length - pos):  # O_DIRECT reads are short only at EOF
            raise EOFError(f"{path}: short read at {pos + got} of {length}")
        done = 0
        while done < got:
            p = parts[pi]
            k = min(p.numel() - poff, got - done)
            p[poff : poff + k].copy_(bounce.tensor[done : done + k])
            done, poff = done + k, poff + k
            if poff == p.numel():
                pi, poff = pi + 1, 0
        pos += got


def _read_buffered(fd: int, parts: list[torch.Tensor], path: Path) -> None:
    for p in parts:
        view = memoryview(p.numpy())
        while view:
            n = os.readv(fd, [view])
            if not n:
                raise EOFError(f"{path}: short read")
            view = view[n:]


class StreamWriteFloor(Method):
    """Tensor bytes in N files, written by N threads (+ fsync each); load = N-stream cold read."""

    can_load = True
    priority = 0

    def __init__(self, streams: int, direct: bool = False) -> None:
        self.streams = streams
        self.direct = direct
        self._pool: ThreadPoolExecutor | None = None
        self._bounce: list[_Bounce] = []
        self._segments: list[list[Segment]] = []

    def setup(self, ctx: BenchContext) -> None:
        sizes = [t.numel() * t.element_size() for t in iter_tensors(ctx.state)]
        self._segments = stream_segments(sizes, self.streams)
        if self.streams > 1:
            self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="floor")
        if self.direct:
            per_stream = _round_up(-(-ctx.nbytes // self.streams)) or ALIGN
            self._bounce = [_Bounce(min(CHUNK, per_stream)) for _ in range(self.streams)]

    def _each_stream(self, fn: Any) -> None:
        if self._pool is None:
            fn(0)
            return
        for fut in [self._pool.submit(fn, i) for i in range(self.streams)]:
            fut.result()

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        tensors = list(iter_tensors(state))
        path.mkdir()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if self.direct else 0)

        def write(i: int) -> None:
            parts = _parts(tensors, self._segments[i])
            fd = os.open(path / f"stream-{i}.bin", flags, 0o644)
            try:
                if self.direct:
                    _write_direct(fd, parts, self._bounce[i])
                else:
                    for p in parts:
                        _write_all(fd, memoryview(p.numpy()))
                os.fsync(fd)
            finally:
                os.close(fd)

        self._each_stream(write)
        fsync_dir(path)
        fsync_dir(path.parent)
        return Done()

    def load(self, ctx: BenchContext, path: Path) -> Any:
        out = list(iter_tensors(ctx.template()))
        flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)

        def read(i: int) -> None:
            parts = _parts(out, self._segments[i])
            f = path / f"stream-{i}.bin"
            fd = os.open(f, flags)
            try:
                if self.direct:
                    _read_direct(fd, parts, self._bounce[i], f)
                else:
                    _read_buffered(fd, parts, f)
            finally:
                os.close(fd)

        self._each_stream(read)
        return out

    def expected(self, state: dict[str, Any]) -> Any:
        # Raw bytes carry no structure or Python values: compare tensors only.
        return list(iter_tensors(state))

    def info(self) -> dict[str, Any]:
        return {"streams": self.streams, "direct": self.direct}

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        for b in self._bounce:
            b.close()
        self._bounce = []


def direct_io_unsupported(directory: Path) -> str | None:
    """Why O_DIRECT cannot be used in `directory` (e.g. some tmpfs), or None if it can."""
    probe = directory / "o_direct-probe.bin"
    bounce = _Bounce(ALIGN)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            _write_all(fd, bounce.view)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:  # EINVAL on filesystems without O_DIRECT (some tmpfs)
        why = "not supported by" if e.errno in (errno.EINVAL, errno.EOPNOTSUPP) else "failed on"
        return f"O_DIRECT {why} the bench disk's filesystem ({e.strerror})"
    finally:
        bounce.close()
        probe.unlink(missing_ok=True)
    return None


def _median(m: dict[str, Any], key: str) -> float | None:
    if m.get("error") or m.get("skipped"):
        return None
    s = m.get("summary", {}).get(key)
    return s["median"] if s else None


def _best(size: dict[str, Any], names: list[str], key: str) -> dict[str, Any] | None:
    medians = {n: _median(size["methods"].get(n, {}), key) for n in names}
    candidates = {n: v for n, v in medians.items() if v}
    if not candidates:
        return None
    best = min(candidates, key=candidates.__getitem__)
    return {
        "method": best,
        "seconds": candidates[best],
        "gb_per_s": size["nbytes"] / candidates[best] / 1e9,
        "candidates": candidates,
    }


def best_floors(size: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The best write and cold-read floors of one size's results, and ratios against them.

    Best write floor = the lowest median commit (write + fsync) among the floor
    variants `names` that ran at this size; best read floor = the lowest median
    cold load among them (it may be another variant). Adds
    ``commit_vs_best_write`` and ``load_vs_best_read`` to every method's ratios
    and returns ``{"write": ..., "read": ...}`` (each None if no variant ran).
    """
    floors = {"write": _best(size, names, "commit_s"), "read": _best(size, names, "load_s")}
    write = floors["write"]["seconds"] if floors["write"] else None
    read = floors["read"]["seconds"] if floors["read"] else None
    for m in size["methods"].values():
        if "ratios" not in m:
            continue
        c, ld = _median(m, "commit_s"), _median(m, "load_s")
        m["ratios"]["commit_vs_best_write"] = c / write if c and write else None
        m["ratios"]["load_vs_best_read"] = ld / read if ld and read else None
    return floors
