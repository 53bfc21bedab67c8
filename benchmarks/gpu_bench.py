"""GPU benchmark of issue 17: async_ckpt against the hardware floors on one CUDA device.

Every figure is a ratio to a floor measured in the same run, interleaved with it:

(a) D2H staging of a ~300-tensor state: time until ``staged`` with
    ``AsyncCheckpointer(stager=Stager(async_staging=False))`` over one large
    ``pinned.copy_(gpu_buffer)`` of the same bytes (the PCIe floor), target
    <= 1.10x; and the time until ``save()`` returns with ``async_staging=True``,
    target < 5 ms.
(b) a bf16 matmul "training loop" on the compute stream: mean step time while a
    save is staged and written over the mean step time without one, in
    alternating windows, target < 3 % slower.
(c) ``async_ckpt.load`` into CUDA tensors over a cold read of the same files
    into pinned memory plus one pinned H2D copy of the same bytes, target <= 1.15x.
(d) bit-exact save/load round trips on CUDA for every dtype this torch has
    (bfloat16, float8 types, complex, unsigned ...).

``python -m benchmarks.gpu_bench --size 8GiB --budget-s 240 --json-out x.json``;
``benchmarks.gpu_check`` runs it (``make gpu-check``). The size is scaled down to
what the GPU memory, host memory, disk space and time budget allow (the JSON
says which limit applied). ``--device cpu`` runs the same code on the CPU
(no pinning, no streams) to check the plumbing; its figures mean nothing.
Progress goes to stderr; the JSON is rewritten after every phase, so a run
stopped by its caller's timeout still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import torch

import async_ckpt
from async_ckpt import AsyncCheckpointer, Stager
from benchmarks.limits import drop_page_cache, page_cache_fraction
from benchmarks.metrics import fmt_bytes
from benchmarks.sizes import parse_size

MiB = 1 << 20
GiB = 1 << 30
N_TENSORS = 300
ALIGN = 4096  # every tensor's byte count is a multiple of this
MIN_SIZE = 16 * MiB
GPU_RESERVE = 4 * GiB  # matmul operands, the dtype phase, allocator slack
# State-sized disk transfers of a whole run with 3 repeats (saves of (a), (a) async,
# (b), the alone windows of (b), the cold reads of (c)), with a margin.
TRANSFERS_PER_RUN = 24
now = time.perf_counter


def log(msg: str) -> None:
    print(f"[gpu-bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- targets

TARGETS: dict[str, dict[str, Any]] = {
    "d2h_staging": {
        "label": "(a) D2H staging: time to staged / pinned copy_ floor",
        "op": "<=",
        "limit": 1.10,
        "unit": "x",
    },
    "control_back": {
        "label": "(a) control back with async_staging=True",
        "op": "<",
        "limit": 5.0,
        "unit": "ms",
    },
    "step_slowdown": {
        "label": "(b) training-step slowdown during a save",
        "op": "<",
        "limit": 3.0,
        "unit": "%",
    },
    "load": {
        "label": "(c) load into CUDA / (cold read + pinned H2D)",
        "op": "<=",
        "limit": 1.15,
        "unit": "x",
    },
    "bitexact": {
        "label": "(d) bit-exact CUDA round trips, every dtype",
        "op": "==",
        "limit": 0,
        "unit": "mismatches",
    },
}


def evaluate(key: str, value: float | None, detail: str = "") -> dict[str, Any]:
    """One target's row: its measured value against its limit (``pass``/``miss``)."""
    spec = TARGETS[key]
    if value is None:
        result = "not measured"
    else:
        ok = {
            "<=": value <= spec["limit"],
            "<": value < spec["limit"],
            "==": value == spec["limit"],
        }[spec["op"]]
        result = "pass" if ok else "miss"
    return {"key": key, **spec, "value": value, "result": result, "detail": detail}


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def d2h_target(staged_s: Sequence[float], floor_s: Sequence[float]) -> dict[str, Any]:
    s, f = _median(staged_s), _median(floor_s)
    if s is None or f is None or f <= 0:
        return evaluate("d2h_staging", None, "no runs")
    return evaluate(
        "d2h_staging", s / f, f"{s * 1e3:.1f} ms vs {f * 1e3:.1f} ms, median of {len(staged_s)}"
    )


def control_back_target(return_s: Sequence[float]) -> dict[str, Any]:
    m = _median(return_s)
    if m is None:
        return evaluate("control_back", None, "no runs")
    return evaluate(
        "control_back",
        m * 1e3,
        f"median of {len(return_s)}, max {max(return_s) * 1e3:.2f} ms",
    )


def slowdown_target(alone_s: Sequence[float], during_s: Sequence[float]) -> dict[str, Any]:
    """Mean step time during saves over mean step time without, as percent slower."""
    if not alone_s or not during_s:
        return evaluate("step_slowdown", None, "no steps")
    a, d = statistics.fmean(alone_s), statistics.fmean(during_s)
    return evaluate(
        "step_slowdown",
        (d / a - 1) * 100,
        f"mean step {d * 1e3:.2f} vs {a * 1e3:.2f} ms ({len(during_s)}/{len(alone_s)} steps; "
        f"medians {statistics.median(during_s) * 1e3:.2f}/{statistics.median(alone_s) * 1e3:.2f})",
    )


def load_target(
    load_s: Sequence[float],
    read_s: Sequence[float],
    h2d_s: Sequence[float],
    cached: Sequence[float] = (),
) -> dict[str, Any]:
    """``cached``: the fraction of the checkpoint in the page cache before each read."""
    lo = _median(load_s)
    floors = [r + h for r, h in zip(read_s, h2d_s, strict=True)]
    fl = _median(floors)
    if lo is None or fl is None or fl <= 0:
        return evaluate("load", None, "no runs")
    detail = (
        f"{lo:.3f} s vs {fl:.3f} s (read {_median(read_s):.3f} + H2D {_median(h2d_s):.3f}), "
        f"median of {len(load_s)}"
    )
    if cached and max(cached) > 0.05:
        detail += f"; NOT cold: up to {max(cached):.0%} was in the page cache"
    return evaluate("load", lo / fl, detail)


def bitexact_target(per_dtype: dict[str, str]) -> dict[str, Any]:
    if not per_dtype:
        return evaluate("bitexact", None, "no dtypes")
    bad = sorted(name for name, outcome in per_dtype.items() if outcome != "ok")
    detail = f"{len(per_dtype) - len(bad)}/{len(per_dtype)} dtypes exact"
    if bad:
        detail += "; not: " + ", ".join(f"{n} ({per_dtype[n]})" for n in bad)
    return evaluate("bitexact", len(bad), detail)


def all_targets(phases: dict[str, Any]) -> list[dict[str, Any]]:
    """The target rows from the phases' raw figures (missing phases: not measured)."""
    a = phases.get("staging_sync") or {}
    b = phases.get("staging_async") or {}
    t = phases.get("training") or {}
    c = phases.get("load") or {}
    d = phases.get("dtypes") or {}
    rows = [
        d2h_target(a.get("staged_s", []), a.get("floor_s", [])),
        control_back_target(b.get("return_s", [])),
        slowdown_target(t.get("alone_step_s", []), t.get("during_step_s", [])),
        load_target(
            c.get("load_s", []),
            c.get("read_s", []),
            c.get("h2d_s", []),
            c.get("page_cache_before_read", []),
        ),
        bitexact_target(d.get("per_dtype", {})),
    ]
    for row in rows:
        phase = {"d2h_staging": a, "control_back": b, "step_slowdown": t, "load": c}.get(
            row["key"], d
        )
        if row["result"] == "not measured" and phase.get("error"):
            row["detail"] = phase["error"]
        if row["result"] == "not measured" and phase.get("skipped"):
            row["detail"] = phase["skipped"]
    return rows


# ---------------------------------------------------------------------------- sizing


def choose_size(
    requested: int,
    *,
    gpu_free: int | None,
    host_available: int,
    disk_free: int,
    disk_bytes_per_s: float | None,
    time_s: float,
) -> tuple[int, str]:
    """The state size to run with, and which limit set it.

    GPU: the state plus a floor buffer of the same size, plus ``GPU_RESERVE``.
    Host: one pinned staging arena, one pinned floor buffer and the page cache
    of a checkpoint, with room to spare (a fifth of what is available). Disk:
    two checkpoints and slack. Time: ``TRANSFERS_PER_RUN`` state-sized disk
    transfers at the measured write speed within ``time_s``.
    """
    limits: dict[str, float] = {"requested": requested}
    if gpu_free is not None:
        limits["GPU memory"] = (gpu_free - GPU_RESERVE) / 2
    limits["host memory"] = host_available / 5
    limits["disk space"] = disk_free / 3
    if disk_bytes_per_s:
        limits["time budget"] = disk_bytes_per_s * time_s / TRANSFERS_PER_RUN
    name = min(limits, key=lambda k: limits[k])
    size = int(limits[name]) // MiB * MiB
    return max(size, MIN_SIZE), name


def probe_write_speed(directory: Path, nbytes: int = 256 * MiB) -> float:
    """Bytes per second of a sequential write + fsync of ``nbytes`` in ``directory``."""
    path = directory / "write-probe.bin"
    block = os.urandom(8 * MiB)
    t0 = now()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dt = now() - t0
    path.unlink()
    return max(1, nbytes // len(block)) * len(block) / dt


# ---------------------------------------------------------------------------- state


def tensor_plan(nbytes: int, n: int = N_TENSORS) -> list[tuple[str, torch.dtype, int]]:
    """``n`` tensors (name, dtype, bytes) totalling ``nbytes`` (rounded to ``ALIGN``).

    Large, medium and small tensors in turn (16:4:1), two thirds bfloat16
    parameters and one third float32 (optimizer-like).
    """
    weights = [(16, 4, 1)[i % 3] for i in range(n)]
    total_w = sum(weights)
    sizes = [max(ALIGN, nbytes * w // total_w // ALIGN * ALIGN) for w in weights]
    rest = nbytes // ALIGN * ALIGN - sum(sizes)
    sizes[0] = max(ALIGN, sizes[0] + rest // ALIGN * ALIGN)
    return [
        (f"layer{i // 3:03d}.t{i % 3}", torch.float32 if i % 3 == 2 else torch.bfloat16, nb)
        for i, nb in enumerate(sizes)
    ]


def _random_bytes(nbytes: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256, generator=g)


def _shaped(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = raw.view(dtype)
    return t.view(-1, 256) if t.numel() % 256 == 0 else t


def make_state(
    plan: list[tuple[str, torch.dtype, int]], device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    return {
        name: _shaped(_random_bytes(nb, device, seed + i), dtype)
        for i, (name, dtype, nb) in enumerate(plan)
    }


def state_mismatches(
    state: dict[str, torch.Tensor], plan: list[tuple[str, torch.dtype, int]], seed: int = 0
) -> list[str]:
    """Names of the tensors whose bytes differ from what ``make_state`` made."""
    bad = []
    for i, (name, _, nb) in enumerate(plan):
        t = state[name]
        want = _random_bytes(nb, t.device, seed + i)
        if not torch.equal(t.reshape(-1).view(torch.uint8), want):
            bad.append(name)
    return bad


def _zeros(like: torch.Tensor) -> torch.Tensor:
    """A zeroed contiguous tensor like ``like``, with no fill kernel of its dtype (float8...)."""
    t = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    t.view(torch.uint8).zero_()
    return t


def round_trip_dtypes() -> list[torch.dtype]:
    """Every storable dtype of this torch: not quantized, not sub-byte, not ``bits*``."""
    found = {}
    for name in dir(torch):
        d = getattr(torch, name, None)
        if not isinstance(d, torch.dtype) or str(d).startswith(("torch.q", "torch.bits")):
            continue
        try:
            with warnings.catch_warnings():  # complex32: "ComplexHalf support is experimental"
                warnings.simplefilter("ignore")
                torch.empty(2, dtype=d).copy_(
                    torch.zeros(2 * d.itemsize, dtype=torch.uint8).view(d)
                )
        except Exception:  # the sub-byte int1..int7/uint1..uint7 have no copy kernel
            continue
        found[str(d)] = d
    return [found[k] for k in sorted(found)]


# ---------------------------------------------------------------------------- device


class Dev:
    """The device under test: CUDA (pinned memory, synchronize) or the CPU dry run."""

    def __init__(self, name: str) -> None:
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def describe(self) -> dict[str, Any]:
        if not self.cuda:
            return {"device": "cpu", "note": "dry run on the CPU: the figures mean nothing"}
        p = torch.cuda.get_device_properties(self.device)
        return {
            "device": "cuda",
            "name": p.name,
            "total_memory": p.total_memory,
            "capability": f"{p.major}.{p.minor}",
            "torch_cuda": torch.version.cuda,
        }

    def free_memory(self) -> int | None:
        return torch.cuda.mem_get_info(self.device)[0] if self.cuda else None


# ---------------------------------------------------------------------------- phases


class Bench:
    def __init__(self, args: argparse.Namespace, dev: Dev, deadline: float) -> None:
        self.args = args
        self.dev = dev
        self.deadline = deadline
        self.dir = Path(args.dir)
        self.repeats = args.repeats
        self.seq = 0
        self.result: dict[str, Any] = {"phases": {}}
        self.state: dict[str, torch.Tensor] = {}
        self.plan: list[tuple[str, torch.dtype, int]] = []
        self.nbytes = 0
        self.save_s = 1.0  # running estimate of one save's commit time
        self.last_ckpt: Path | None = None
        self._host: torch.Tensor | None = None
        self._gpu: torch.Tensor | None = None
        self.async_ckpt: AsyncCheckpointer | None = None

    # helpers
    def host_buffer(self) -> torch.Tensor:
        """The floors' (pinned) host buffer of the state's size."""
        if self._host is None:
            self._host = self.dev.host(self.nbytes)
        return self._host

    def gpu_buffer(self) -> torch.Tensor:
        """The floors' device buffer of the state's size, random bytes."""
        if self._gpu is None:
            self._gpu = _random_bytes(self.nbytes, self.dev.device, 12345)
        return self._gpu

    def left(self) -> float:
        return self.deadline - now()

    def path(self, tag: str) -> Path:
        self.seq += 1
        return self.dir / f"{tag}-{self.seq}"

    def dump(self) -> None:
        self.result["targets"] = all_targets(self.result["phases"])
        if self.args.json_out:
            tmp = Path(str(self.args.json_out) + ".tmp")
            tmp.write_text(json.dumps(self.result, indent=2, default=str))
            tmp.replace(self.args.json_out)

    def phase(self, name: str, fn: Callable[[dict[str, Any]], None], needs_s: float) -> None:
        out: dict[str, Any] = {}
        self.result["phases"][name] = out
        if self.left() < needs_s:
            out["skipped"] = (
                f"skipped: {self.left():.0f} s left of the budget, needs ~{needs_s:.0f}"
            )
            log(f"{name}: {out['skipped']}")
            self.dump()
            return
        log(f"{name}: start ({self.left():.0f} s left)")
        t0 = now()
        try:
            fn(out)
        except Exception as exc:  # one phase failing leaves the others' figures
            out["error"] = f"{type(exc).__name__}: {exc}"
            log(f"{name}: failed: {out['error']}")
        out["wall_s"] = now() - t0
        self.dump()

    def more(self, r: int, cost_s: float) -> bool:
        """Another repeat? ``repeats`` of them while the budget lasts (at least one)."""
        return r < self.repeats and (r == 0 or self.left() > cost_s + 5)

    # (d) dtypes
    def dtypes(self, out: dict[str, Any]) -> None:
        device = self.dev.device
        per: dict[str, str] = {}
        made: dict[str, torch.Tensor] = {}
        for d in round_trip_dtypes():
            name = str(d).removeprefix("torch.")
            try:
                with warnings.catch_warnings():  # complex32 is "experimental"
                    warnings.simplefilter("ignore")
                    if d == torch.bool:
                        t = torch.randint(0, 2, (4097,), device=device).bool()
                    else:
                        t = _random_bytes(4097 * d.itemsize, device, len(made)).view(d)
                made[name] = t
            except Exception as exc:
                per[name] = f"cannot make on {device.type}: {type(exc).__name__}"
        made["bfloat16_noncontig"] = (
            _random_bytes(64 * 96 * 2, device, 99).view(torch.bfloat16).view(64, 96)[:, ::3]
        )

        def one(names: list[str]) -> None:
            path = self.path("dtypes")
            src = {n: made[n] for n in names}
            async_ckpt.save(src, checkpoint_id=path)
            target = {n: _zeros(made[n]) for n in names}
            async_ckpt.load(target, checkpoint_id=path)
            self.dev.sync()
            for n in names:
                got, want = target[n], made[n]
                same = (
                    got.dtype == want.dtype
                    and got.device == want.device
                    and torch.equal(
                        got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
                    )
                )
                per[n] = "ok" if same else "mismatch"
            shutil.rmtree(path, ignore_errors=True)

        try:
            one(list(made))
        except Exception:  # find the dtypes that fail, one save each
            for n in made:
                try:
                    one([n])
                except Exception as exc:
                    per[n] = f"{type(exc).__name__}: {str(exc)[:80]}"
        out["per_dtype"] = dict(sorted(per.items()))

    # (a) staging with async_staging=False vs the pinned copy_ floor
    def staging_sync(self, out: dict[str, Any]) -> None:
        dev, n = self.dev, self.nbytes
        src = self.gpu_buffer()  # the floor's source
        t0 = now()
        host = self.host_buffer()[:n]
        out["pinned_alloc_s"] = now() - t0

        def floor() -> float:
            dev.sync()
            t = now()
            host.copy_(src)
            dev.sync()
            return now() - t

        staged, floors, stats_staged, commits = [], [], [], []
        with AsyncCheckpointer(stager=Stager(async_staging=False)) as ckpt:
            t0 = now()
            ckpt.start(self.state)
            out["start_s"] = now() - t0

            def ours(keep: bool = False) -> float:
                path = self.path("sync")
                dev.sync()
                t = now()
                fut = ckpt.save(self.state, checkpoint_id=path)
                fut.staged.result()
                dt = now() - t
                fut.result()
                stats_staged.append(fut.stats.staged_s)
                commits.append(fut.stats.total_s)
                self.save_s = fut.stats.total_s
                shutil.rmtree(path, ignore_errors=True)
                return dt

            out["warmup_floor_s"], out["warmup_staged_s"] = floor(), ours()
            stats_staged.clear()
            commits.clear()
            r = 0
            while self.more(r, self.save_s + 1):
                if r % 2:
                    floors.append(floor())
                    staged.append(ours())
                else:
                    staged.append(ours())
                    floors.append(floor())
                r += 1
        out.update(
            staged_s=staged,
            floor_s=floors,
            stats_staged_s=stats_staged,
            commit_s=commits,
            floor_gbps=[n / f / 1e9 for f in floors],
        )

    # (a) control back with async_staging=True, then (b) the training loop
    def staging_async(self, out: dict[str, Any]) -> None:
        dev = self.dev
        ret, staged = [], []
        ckpt = self.async_ckpt = AsyncCheckpointer(stager=Stager(async_staging=True))
        ckpt.start(self.state)

        def ours() -> tuple[float, float]:
            path = self.path("async")
            dev.sync()
            t = now()
            fut = ckpt.save(self.state, checkpoint_id=path)
            back = now() - t
            fut.staged.result()
            st = now() - t
            fut.result()
            self.save_s = fut.stats.total_s
            shutil.rmtree(path, ignore_errors=True)
            return back, st

        out["warmup_return_s"], out["warmup_staged_s"] = ours()
        r = 0
        while self.more(r, self.save_s + 1):
            back, st = ours()
            ret.append(back)
            staged.append(st)
            r += 1
        out.update(return_s=ret, staged_s=staged)

    def training(self, out: dict[str, Any]) -> None:
        dev, args = self.dev, self.args
        if self.async_ckpt is None:
            self.async_ckpt = AsyncCheckpointer(stager=Stager(async_staging=True))
        ckpt = self.async_ckpt
        dim = args.matmul_dim
        dtype = torch.bfloat16 if dev.cuda else torch.float32
        a = torch.randn(dim, dim, device=dev.device).to(dtype) / dim**0.5
        b = torch.randn(dim, dim, device=dev.device).to(dtype) / dim**0.5
        c = torch.empty_like(a)

        def matmuls() -> None:
            for _ in range(args.matmuls_per_step):
                torch.matmul(a, b, out=c)

        def step(before: Callable[[], Any] | None = None) -> tuple[float, Any]:
            t = now()
            got = before() if before else None
            matmuls()
            dev.sync()
            return now() - t, got

        for _ in range(10):
            step()
        alone: list[float] = []
        during: list[float] = []
        windows: list[dict[str, float]] = []
        window_s = max(self.save_s, 0.5)

        def alone_window() -> None:
            t0, k = now(), 0
            while now() - t0 < window_s or k < 5:
                alone.append(step()[0])
                k += 1

        def during_window() -> None:
            nonlocal window_s
            path = self.path("train")
            t0 = now()
            dt, fut = step(lambda: ckpt.save(self.state, checkpoint_id=path))
            during.append(dt)
            k = 1
            while not fut.done() or k < 5:
                during.append(step()[0])
                k += 1
            fut.result()
            window_s = now() - t0
            windows.append({"save_s": window_s, "steps": k, "commit_s": fut.stats.total_s})
            if self.last_ckpt is not None:
                shutil.rmtree(self.last_ckpt, ignore_errors=True)
            self.last_ckpt = path

        r = 0
        while self.more(r, 2 * window_s + 1):
            if r % 2:
                during_window()
                alone_window()
            else:
                alone_window()
                during_window()
            r += 1
        out.update(
            alone_step_s=alone,
            during_step_s=during,
            windows=windows,
            matmul=f"{args.matmuls_per_step} x {dim}x{dim} {str(dtype).removeprefix('torch.')}",
        )

    # (c) load into device tensors vs cold read + pinned H2D
    def load(self, out: dict[str, Any]) -> None:
        dev, n = self.dev, self.nbytes
        path = self.last_ckpt
        if path is None:
            path = self.path("load")
            async_ckpt.save(self.state, checkpoint_id=path)
            self.last_ckpt = path
        files = [p for p in sorted(path.rglob("*")) if p.is_file()]
        total = sum(p.stat().st_size for p in files)
        host = self.host_buffer()
        cap = host.numel()
        gpu = self.gpu_buffer()
        chunk = min(64 * MiB, cap)
        jobs: list[tuple[Path, int, int, int]] = []  # file, offset, length, buffer offset
        pos = 0
        for p in files:
            size = p.stat().st_size
            for off in range(0, size, chunk):
                ln = min(chunk, size - off)
                if pos + ln > cap:
                    pos = 0
                jobs.append((p, off, ln, pos))
                pos += ln
        view = memoryview(host.numpy())

        def read_one(job: tuple[Path, int, int, int]) -> None:
            p, off, ln, at = job
            fd = os.open(p, os.O_RDONLY)
            try:
                done = 0
                while done < ln:
                    got = os.preadv(fd, [view[at + done : at + ln]], off + done)
                    if got <= 0:
                        raise OSError(f"short read of {p}")
                    done += got
            finally:
                os.close(fd)

        pool = ThreadPoolExecutor(self.args.read_threads)
        loads, reads, h2ds, cached = [], [], [], []

        def floor() -> None:
            drop_page_cache(path)
            cached.append(page_cache_fraction(path))
            t = now()
            list(pool.map(read_one, jobs))
            t1 = now()
            gpu.copy_(host[:n])
            dev.sync()
            reads.append(t1 - t)
            h2ds.append(now() - t1)

        def ours() -> None:
            for t in self.state.values():
                t.zero_()
            dev.sync()
            drop_page_cache(path)
            cached.append(page_cache_fraction(path))
            t = now()
            async_ckpt.load(self.state, checkpoint_id=path)
            dev.sync()
            loads.append(now() - t)

        try:
            r = 0
            while self.more(r, 3 * self.save_s + 1):
                if r % 2:
                    floor()
                    ours()
                else:
                    ours()
                    floor()
                r += 1
        finally:
            pool.shutdown()
        out.update(
            load_s=loads,
            read_s=reads,
            h2d_s=h2ds,
            file_bytes=total,
            page_cache_before_read=cached,
            read_threads=self.args.read_threads,
            state_mismatches_after_load=state_mismatches(self.state, self.plan),
        )

    # driver
    def run(self) -> dict[str, Any]:
        args, dev = self.args, self.dev
        self.dir.mkdir(parents=True, exist_ok=True)
        t0 = now()
        speed = probe_write_speed(self.dir, min(256 * MiB, max(MIN_SIZE, args.size)))
        probe_s = now() - t0
        vm = psutil.virtual_memory()
        gpu_free = dev.free_memory()
        size, limit = choose_size(
            args.size,
            gpu_free=gpu_free,
            host_available=vm.available,
            disk_free=shutil.disk_usage(self.dir).free,
            disk_bytes_per_s=speed,
            time_s=max(10.0, self.left() - 20),
        )
        self.plan = tensor_plan(size)
        self.nbytes = sum(nb for _, _, nb in self.plan)
        self.save_s = self.nbytes / speed + 0.5
        self.result.update(
            device=dev.describe(),
            size_requested=args.size,
            size=self.nbytes,
            size_label=fmt_bytes(self.nbytes),
            size_limited_by=limit,
            n_tensors=len(self.plan),
            write_probe_gbps=speed / 1e9,
            write_probe_s=probe_s,
            gpu_free_at_start=gpu_free,
            host_available_at_start=vm.available,
            repeats=self.repeats,
            dir=str(self.dir),
        )
        log(f"state {fmt_bytes(self.nbytes)} in {len(self.plan)} tensors (limited by {limit})")
        self.phase("dtypes", self.dtypes, 5)
        self.state = make_state(self.plan, dev.device)
        dev.sync()
        est = self.save_s
        try:
            self.phase("staging_sync", self.staging_sync, 3 * est)
            self.phase("staging_async", self.staging_async, 3 * est)
            self.phase("training", self.training, 3 * est)
            self.phase("load", self.load, 3 * est)
        finally:
            if self.async_ckpt is not None:
                self.async_ckpt.close()
            if self.last_ckpt is not None:
                shutil.rmtree(self.last_ckpt, ignore_errors=True)
        self.result["wall_s"] = now() - t0
        self.dump()
        return self.result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("8GiB"))
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=".bench-tmp/gpu")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--matmul-dim", type=int, default=None)
    p.add_argument("--matmuls-per-step", type=int, default=4)
    p.add_argument("--read-threads", type=int, default=4)
    args = p.parse_args(argv)
    if args.matmul_dim is None:
        args.matmul_dim = 8192 if args.device == "cuda" else 256
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device here")
        return 2
    bench = Bench(args, Dev(args.device), now() + args.budget_s)
    result = bench.run()
    for row in result["targets"]:
        log(f"{row['label']}: {row['value']} {row['unit']} -> {row['result']} ({row['detail']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
