"""Control traffic, planning time and memory per rank: ours against DCP, 2..8 gloo ranks.

    python -m benchmarks.scale_model --ranks 2 4 8 --items 300 --steady 3

The measured half of docs/scale.md. Each rank holds ``--items`` row-sharded
DTensors (a ``ROWS x COLS`` float32 shard each, so every tensor has one chunk
per rank and nothing is deduplicated) and saves them with three methods, each
into its own directory under ``--dir``:

- ``ours``: :func:`async_ckpt.pipeline.save.run_save` as the worker runs it
  (one ``Planner`` kept across saves, the arrival check-in first, a
  ``DescribeCache``), synchronously from the rank's own process;
- ``dcp``: ``torch.distributed.checkpoint.save`` with ``DefaultSavePlanner()``;
- ``dcp_cached``: the same with ``DefaultSavePlanner(enable_plan_caching=True)``.

Two passes, each its own launch of the ranks, and in each, per method, a
first save (a fresh planner and, for DCP, its class-level plan cache
cleared) followed by steady saves of the same state:

1. timed (``1 + --steady`` saves): wall and CPU (``time.process_time``) time
   of the planning phase on every rank (ours: flatten + describe, then
   ``Planner.plan``; DCP: its ``reduce_scatter("plan")``, i.e. local plan,
   gather to the coordinator, global plan, scatter back), DCP's global step
   on the coordinator alone, and the whole save; steady figures are the
   median over the steady saves;
2. counted (first + one steady save): the bytes of every object collective
   and tensor all-to-all the save makes (see :class:`Meter` for what is
   counted), split into the planning phase and the rest (the commit: write
   results to the coordinator, the outcome or metadata back), and how far the
   traced Python heap (``tracemalloc``) rises during the planning phase and
   inside each commit collective, on every rank. (Not over the whole save:
   the local writer's commit reads the replaced metadata with a 64 MiB
   ``os.read`` buffer, which tracemalloc counts in full though it is barely
   touched.) tracemalloc runs for the whole counted launch, never in the
   timed one.

Writes ``benchmarks/results/scale-<stamp>.json`` (``--out``) and prints a table.
Timings on a small shared machine are noisy and, past the core count,
oversubscribed; the byte counts are exact for this state and do not depend
on the machine.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pickle
import platform
import shutil
import statistics
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.ranks import run_ranks

ROWS, COLS = 4, 16  # each rank's shard of each tensor: 256 bytes; control traffic is what counts
METHODS = ("ours", "dcp", "dcp_cached")
COORDINATOR = 0


class _CountingSink:
    """A file object that only counts what is written to it (pickled size without a copy)."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)


def pickled_size(obj: Any) -> int:
    """Bytes of ``obj`` pickled as torch's object collectives pickle it (default protocol)."""
    sink = _CountingSink()
    pickle.Pickler(sink).dump(obj)
    return sink.n


class Meter:
    """Counts the control traffic of the collectives a save makes on this rank.

    Wraps ``torch.distributed``'s object collectives (``all_gather_object``,
    ``gather_object``, ``broadcast_object_list``, ``scatter_object_list``)
    and ``all_to_all_single``; both async_ckpt (``dist/comm.py``) and DCP
    (``checkpoint/utils.py``) call them through the module, so one set of
    wrappers counts both. Per call it adds, for this rank:

    - ``in``: payload bytes that arrive here from other ranks: pickled objects
      as torch sends them, plus the 8-byte size words torch exchanges first
      (``gather_object`` and ``all_gather_object`` all-gather every rank's
      size; the broadcasts send one size per object); padding to the largest
      object is not counted;
    - ``out``: payload bytes that start here, times the ranks that need them
      (what a flat algorithm sends; a ring or tree moves the same total but
      spreads the forwarding).

    With ``sizes=False`` only calls are counted (no pickling: the timed pass).
    ``phase`` labels what follows (``plan``, ``commit``, ``arrival``).
    """

    NAMES = (
        "all_gather_object",
        "gather_object",
        "broadcast_object_list",
        "scatter_object_list",
        "all_to_all_single",
    )

    def __init__(self) -> None:
        self.phase = "other"
        self.sizes = False
        self.records: list[dict[str, Any]] = []
        self._originals: dict[str, Callable] = {}

    def install(self) -> None:
        for name in self.NAMES:
            original = getattr(dist, name)
            self._originals[name] = original
            setattr(dist, name, self._wrap(name, original))

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def reset(self, sizes: bool) -> None:
        self.records, self.sizes, self.phase = [], sizes, "other"

    def _wrap(self, name: str, original: Callable) -> Callable:
        signature = inspect.signature(original)
        account = getattr(self, "_" + name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            watch = self.sizes and self.phase == "commit" and tracemalloc.is_tracing()
            m0 = _mem_start() if watch else 0
            t0 = time.perf_counter()
            result = original(*args, **kwargs)
            elapsed = time.perf_counter() - t0
            peak = _mem_peak(m0) if watch else 0
            group = bound.arguments.get("group")
            world, me = dist.get_world_size(group), dist.get_rank(group)
            record = {"phase": self.phase, "op": name, "s": elapsed, "in": 0, "out": 0}
            record["peak"] = peak
            if self.sizes:
                record["in"], record["out"] = account(bound.arguments, world, me)
            self.records.append(record)
            return result

        return wrapper

    @staticmethod
    def _all_gather_object(a: dict, world: int, me: int) -> tuple[int, int]:
        sizes = [pickled_size(o) for o in a["object_list"]]
        words = 8 * (world - 1)
        return sum(sizes) - sizes[me] + words, sizes[me] * (world - 1) + words

    @staticmethod
    def _gather_object(a: dict, world: int, me: int) -> tuple[int, int]:
        words = 8 * (world - 1)  # torch all-gathers every rank's size first
        gathered = a.get("object_gather_list")
        if gathered is not None:  # the destination
            return sum(pickled_size(o) for r, o in enumerate(gathered) if r != me) + words, words
        return words, pickled_size(a["obj"]) + words

    @staticmethod
    def _broadcast_object_list(a: dict, world: int, me: int) -> tuple[int, int]:
        objects = a["object_list"]
        size = sum(pickled_size(o) for o in objects) + 8 * len(objects)
        src = a.get("src")
        if src is None:
            src = a.get("group_src") or 0
        return (0, size * (world - 1)) if dist.get_rank() == src else (size, 0)

    @staticmethod
    def _scatter_object_list(a: dict, world: int, me: int) -> tuple[int, int]:
        sent = a.get("scatter_object_input_list")
        if sent is not None:  # the source: one piece to each other rank, after a max-size word
            return 0, sum(pickled_size(o) for r, o in enumerate(sent) if r != me) + 8 * (world - 1)
        return pickled_size(a["scatter_object_output_list"][0]) + 8, 0

    @staticmethod
    def _all_to_all_single(a: dict, world: int, me: int) -> tuple[int, int]:
        sent = a["input"]
        peers = sent.numel() * sent.element_size() * (world - 1) // world
        return peers, peers

    def summary(self) -> dict[str, dict[str, float]]:
        """Per phase: bytes in and out of this rank, calls, seconds inside the collectives."""
        out: dict[str, dict[str, float]] = {}
        for r in self.records:
            phase = out.setdefault(r["phase"], {"in": 0, "out": 0, "calls": 0, "s": 0.0, "peak": 0})
            phase["peak"] = max(phase["peak"], r["peak"])
            phase["in"] += r["in"]
            phase["out"] += r["out"]
            phase["calls"] += 1
            phase["s"] += r["s"]
        return out


def _mem_start() -> int:
    """Traced Python heap now, with the peak reset to it (0 when not tracing)."""
    if not tracemalloc.is_tracing():
        return 0
    tracemalloc.reset_peak()
    return tracemalloc.get_traced_memory()[0]


def _mem_peak(start: int) -> int:
    """How far the traced heap rose above ``start`` since :func:`_mem_start`."""
    if not tracemalloc.is_tracing():
        return 0
    return max(0, tracemalloc.get_traced_memory()[1] - start)


def _state_dict(rank: int, world: int, items: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    return {
        f"model.layer{i}.weight": DTensor.from_local(
            torch.full((ROWS, COLS), float(rank * items + i)), mesh, [Shard(0)], run_check=False
        )
        for i in range(items)
    }


class _Ours:
    """run_save as the worker calls it: a kept Planner, check-in, a DescribeCache."""

    def __init__(self, directory: str) -> None:
        from async_ckpt.dist.arrival import group_store
        from async_ckpt.dist.comm import GroupComm
        from async_ckpt.planning.plan import Planner
        from async_ckpt.state.describe import DescribeCache

        self.directory = directory
        self.comm = GroupComm(None)
        found = group_store(None)
        if found is not None:
            self.comm.store, self.comm.arrival_scope = found[0], f"scale-bench/{directory}"
        self.planner = Planner()
        self.cache = DescribeCache()

    def save(self, state_dict: dict, meter: Meter) -> dict[str, float]:
        from async_ckpt.dist.arrival import check_in
        from async_ckpt.pipeline.save import SaveTimings, run_save
        from async_ckpt.pipeline.waves import memory_waves
        from async_ckpt.state.describe import describe
        from async_ckpt.state.flatten import flatten
        from async_ckpt.storage.local import FileSystemWriter

        t0 = time.perf_counter()
        meter.phase = "arrival"
        check_in(self.comm, "scale benchmark save")
        t1 = time.perf_counter()
        meter.phase = "plan"
        times: dict[str, float] = {}
        m0 = _mem_start()
        c0 = time.process_time()
        state, tensors = describe(flatten(state_dict), self.cache)
        t2 = time.perf_counter()
        waves = memory_waves(state, tensors)
        plan = self.planner.plan

        def labelled(*args: Any) -> Any:
            meter.phase = "plan"
            try:
                return plan(*args)
            finally:
                times["plan_peak"] = _mem_peak(m0)
                times["plan_cpu_s"] = time.process_time() - c0
                meter.phase = "commit"

        self.planner.plan = labelled  # type: ignore[method-assign]
        timings = SaveTimings()
        writer = FileSystemWriter(self.directory, sync_files=False)
        try:
            run_save(state, waves, writer, self.comm, self.planner, timings=timings)
        finally:
            del self.planner.plan
        end = time.perf_counter()
        return {
            **times,
            "arrival_s": t1 - t0,
            "describe_s": t2 - t1,
            "plan_s": (t2 - t1) + timings.plan_s,
            "save_s": end - t0,
            "plan_reused": float(timings.plan_reused),
        }


class _Dcp:
    """torch.distributed.checkpoint.save with the default planner, plan caching on or off."""

    _CACHES = (
        "_cached_save_plan",
        "_cached_all_plans",
        "_cached_global_plan",
        "_cached_metadata",
        "_cached_final_save_plan",
    )

    def __init__(self, directory: str, caching: bool) -> None:
        from torch.distributed.checkpoint.planner import SavePlanner

        self.directory, self.caching = directory, caching
        for name in self._CACHES:  # a first save: nothing cached from another method
            getattr(SavePlanner, name, {}).clear()

    def save(self, state_dict: dict, meter: Meter) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
        from torch.distributed.checkpoint.utils import _DistWrapper

        times: dict[str, float] = {
            "plan_s": 0.0,
            "global_s": 0.0,
            "plan_peak": 0,
            "plan_cpu_s": 0.0,
        }
        planner = DefaultSavePlanner(enable_plan_caching=self.caching)
        create_global = planner.create_global_plan

        def timed_global(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return create_global(*args)
            finally:
                times["global_s"] += time.perf_counter() - t

        planner.create_global_plan = timed_global  # type: ignore[method-assign]
        reduce_scatter, all_reduce = _DistWrapper.reduce_scatter, _DistWrapper.all_reduce

        def rs(wrapper: Any, step: str, *args: Any) -> Any:
            meter.phase = "plan"
            m0 = _mem_start()
            t, c = time.perf_counter(), time.process_time()
            try:
                return reduce_scatter(wrapper, step, *args)
            finally:
                times["plan_s"] += time.perf_counter() - t
                times["plan_cpu_s"] += time.process_time() - c
                times["plan_peak"] = _mem_peak(m0)
                meter.phase = "commit"

        def ar(wrapper: Any, step: str, *args: Any) -> Any:
            meter.phase = "commit"
            return all_reduce(wrapper, step, *args)

        _DistWrapper.reduce_scatter, _DistWrapper.all_reduce = rs, ar  # type: ignore[method-assign]
        writer = dcp.FileSystemWriter(self.directory, sync_files=False, overwrite=True)
        t0 = time.perf_counter()
        try:
            dcp.save(state_dict, storage_writer=writer, planner=planner)
        finally:
            _DistWrapper.reduce_scatter, _DistWrapper.all_reduce = reduce_scatter, all_reduce
        times["save_s"] = time.perf_counter() - t0
        return times


def _method(name: str, directory: str) -> _Ours | _Dcp:
    if name == "ours":
        return _Ours(directory)
    return _Dcp(directory, caching=name == "dcp_cached")


def _timed_pass(name: str, root: str, state_dict: dict, meter: Meter, steady: int) -> list[dict]:
    """``1 + steady`` saves, only calls counted: the timings are not slowed by the counting."""
    timed: list[dict[str, float]] = []
    method = _method(name, os.path.join(root, f"{name}-timed"))
    for _ in range(1 + steady):
        meter.reset(sizes=False)
        dist.barrier()
        t = method.save(state_dict, meter)
        t["collective_s"] = sum(r["s"] for r in meter.records)
        timed.append(t)
    return timed


def _counted_pass(name: str, root: str, state_dict: dict, meter: Meter) -> list[dict]:
    """A first and a steady save with every collective's bytes and the heap peaks counted."""
    counted: list[dict[str, Any]] = []
    method = _method(name, os.path.join(root, f"{name}-counted"))
    for _ in range(2):
        meter.reset(sizes=True)
        dist.barrier()
        t = method.save(state_dict, meter)
        summary = meter.summary()
        commit_peak = summary.get("commit", {}).get("peak", 0)
        counted.append({"bytes": summary, "plan_peak": t["plan_peak"], "commit_peak": commit_peak})
    return counted


def _rank(
    rank: int,
    world: int,
    items: int,
    steady: int,
    root: str,
    methods: tuple[str, ...],
    counting: bool,
) -> dict[str, list[dict]]:
    """Per method, the timed pass's saves (``counting=False``) or the counted pass's."""
    if counting:
        # On for the whole life of the rank, started before any thread exists:
        # tracemalloc.stop() while a finished thread frees its state (after
        # join() returned) crashes CPython 3.11 at random (a segfault, seen
        # here as a rank dying in about 1 run in 15 on a busy machine).
        tracemalloc.start()
    torch.set_num_threads(1)
    # DCP warns on every save into an existing directory, even with overwrite=True
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
    state_dict = _state_dict(rank, world, items)
    meter = Meter()
    meter.install()
    try:
        if counting:
            return {name: _counted_pass(name, root, state_dict, meter) for name in methods}
        return {name: _timed_pass(name, root, state_dict, meter, steady) for name in methods}
    finally:
        meter.uninstall()


def _first_and_steady(timed: list[dict], counted: list[dict]) -> dict[str, dict]:
    return {
        "first": {**timed[0], **counted[0]},
        "steady": {
            **{k: statistics.median(t[k] for t in timed[1:]) for k in timed[1]},
            "plan_reused": min(t.get("plan_reused", 0.0) for t in timed[1:]),
            **counted[1],
        },
    }


def measure(
    world: int,
    items: int,
    steady: int = 3,
    methods: tuple[str, ...] = METHODS,
    directory: str | None = None,
    timeout: float = 900,
) -> dict[str, Any]:
    """One world size: per method, ``first``/``steady``, each a list of per-rank dicts.

    Two launches of ``world`` ranks: the timed pass, then the counted pass
    (tracemalloc on from the start of each rank, see :func:`_rank`).
    ``timeout``: how long a rank may stay silent before the run fails with
    the stacks of the silent ranks (see :func:`benchmarks.ranks.run_ranks`).
    """
    root = tempfile.mkdtemp(prefix="scale-", dir=directory)
    try:
        args = (world, items, steady, root, tuple(methods))
        timed = run_ranks(_rank, *args, False, timeout=timeout)
        counted = run_ranks(_rank, *args, True, timeout=timeout)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    per_rank = [
        {name: _first_and_steady(t[name], c[name]) for name in methods}
        for t, c in zip(timed, counted, strict=True)
    ]
    return {
        name: {save: [r[name][save] for r in per_rank] for save in ("first", "steady")}
        for name in methods
    }


def _phase(rank_result: dict[str, Any], phase: str, what: str) -> int:
    return int(rank_result["bytes"].get(phase, {}).get(what, 0))


def rows(world: int, items: int, measured: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat table rows: per method and save kind, coordinator and worst other rank."""
    out = []
    for name, saves in measured.items():
        for save, ranks in saves.items():
            coord, others = ranks[COORDINATOR], [r for i, r in enumerate(ranks) if i != COORDINATOR]
            row: dict[str, Any] = {"world": world, "items": items, "method": name, "save": save}
            for phase in ("plan", "commit"):
                for what in ("in", "out"):
                    row[f"{phase}_{what}_coord"] = _phase(coord, phase, what)
                    row[f"{phase}_{what}_other"] = max(_phase(r, phase, what) for r in others)
                row[f"{phase}_calls"] = _phase(coord, phase, "calls")
            row["arrival_calls"] = _phase(coord, "arrival", "calls")
            row["plan_s_coord"] = coord["plan_s"]
            row["plan_s_max"] = max(r["plan_s"] for r in ranks)
            row["plan_cpu_s_coord"] = coord["plan_cpu_s"]
            row["plan_cpu_s_max"] = max(r["plan_cpu_s"] for r in ranks)
            row["global_s"] = coord.get("global_s", 0.0)
            row["save_s_max"] = max(r["save_s"] for r in ranks)
            for what in ("plan_peak", "commit_peak"):
                row[f"{what}_coord"] = coord[what]
                row[f"{what}_other"] = max(r[what] for r in others)
            out.append(row)
    return out


def _kib(n: float) -> str:
    return f"{n / 1024:.1f}"


def table(all_rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows (KiB, milliseconds)."""
    head = (
        "| W | method | save | plan B in coord | plan B in other | plan B out other | "
        "commit KiB in coord | commit KiB in other | plan ms coord | plan ms max | "
        "plan CPU ms coord | plan CPU ms max | global ms | "
        "save ms max | plan heap coord | plan heap other | commit heap coord |"
    )
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in all_rows:
        lines.append(
            f"| {r['world']} | {r['method']} | {r['save']} | {r['plan_in_coord']} | "
            f"{r['plan_in_other']} | {r['plan_out_other']} | "
            f"{_kib(r['commit_in_coord'])} | {_kib(r['commit_in_other'])} | "
            f"{r['plan_s_coord'] * 1e3:.1f} | {r['plan_s_max'] * 1e3:.1f} | "
            f"{r['plan_cpu_s_coord'] * 1e3:.1f} | {r['plan_cpu_s_max'] * 1e3:.1f} | "
            f"{r['global_s'] * 1e3:.1f} | {r['save_s_max'] * 1e3:.0f} | "
            f"{_kib(r['plan_peak_coord'])} | {_kib(r['plan_peak_other'])} | "
            f"{_kib(r['commit_peak_coord'])} |"
        )
    return (
        "\n".join(lines)
        + "\n(plan traffic in bytes, commit traffic and heap in KiB; per rank per save; coord = rank 0)"
    )


FIT_METRICS = {
    "plan_in_coord": "B",
    "plan_in_other": "B",
    "plan_out_other": "B",
    "commit_in_coord": "B",
    "commit_in_other": "B",
    "plan_s_coord": "s",
    "plan_s_max": "s",
    "plan_cpu_s_coord": "s",
    "plan_cpu_s_max": "s",
    "global_s": "s",
    "plan_peak_coord": "B",
    "plan_peak_other": "B",
}
EXTRAPOLATE_TO = (8, 64, 512, 4096, 16384)


def fit_line(ws: list[int], ys: list[float]) -> dict[str, float]:
    """Least squares ``y = a + b * W``; with the worst relative residual at the points."""
    n = len(ws)
    mean_w, mean_y = sum(ws) / n, sum(ys) / n
    var = sum((w - mean_w) ** 2 for w in ws)
    b = sum((w - mean_w) * (y - mean_y) for w, y in zip(ws, ys, strict=True)) / var if var else 0.0
    a = mean_y - b * mean_w
    worst = max(
        (abs(a + b * w - y) / abs(y) if y else abs(a + b * w)) for w, y in zip(ws, ys, strict=True)
    )
    return {"a": a, "b": b, "max_rel_residual": worst}


def fit(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method, save kind and metric: the line through the measured world sizes."""
    rows_all = [r for run in report["runs"] for r in run["rows"]]
    out = []
    for method in dict.fromkeys(r["method"] for r in rows_all):
        for save in ("first", "steady"):
            sel = sorted(
                (r for r in rows_all if r["method"] == method and r["save"] == save),
                key=lambda r: r["world"],
            )
            if len(sel) < 2:
                continue
            ws = [r["world"] for r in sel]
            for metric, unit in FIT_METRICS.items():
                line = fit_line(ws, [float(r[metric]) for r in sel])
                out.append(
                    {
                        "method": method,
                        "save": save,
                        "metric": metric,
                        "unit": unit,
                        "measured": {str(w): r[metric] for w, r in zip(ws, sel, strict=True)},
                        **line,
                        "extrapolated": {str(w): line["a"] + line["b"] * w for w in EXTRAPOLATE_TO},
                    }
                )
    return out


def _human(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1e3:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {name}"
    return f"{value:.0f} B"


def fit_table(fits: list[dict[str, Any]]) -> str:
    """The fitted lines and their values at :data:`EXTRAPOLATE_TO`, as markdown."""
    head = (
        "| method | save | metric | a | b per rank | worst residual | "
        + " | ".join(f"W={w}" for w in EXTRAPOLATE_TO)
        + " |"
    )
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for f in fits:
        unit = f["unit"]
        values = " | ".join(_human(f["extrapolated"][str(w)], unit) for w in EXTRAPOLATE_TO)
        lines.append(
            f"| {f['method']} | {f['save']} | {f['metric']} | {_human(f['a'], unit)} | "
            f"{_human(f['b'], unit)} | {f['max_rel_residual']:.0%} | {values} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--steady", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dir", default=None, help="where the checkpoints go (a temp dir)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--fit", metavar="JSON", help="only fit and extrapolate a saved run")
    args = parser.parse_args()
    if args.fit:
        with open(args.fit) as f:
            print(fit_table(fit(json.load(f))))
        return
    report: dict[str, Any] = {
        "items_per_rank": args.items,
        "shard": [ROWS, COLS],
        "steady_saves": args.steady,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "runs": [],
    }
    all_rows = []
    for world in args.ranks:
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        measured = measure(world, args.items, args.steady, tuple(args.methods), args.dir)
        new_rows = rows(world, args.items, measured)
        all_rows += new_rows
        report["runs"].append(
            {
                "world": world,
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "wall_s": time.perf_counter() - t0,
                "rows": new_rows,
                "per_rank": measured,
            }
        )
        print(
            f"world {world}: done in {time.perf_counter() - t0:.0f} s, "
            f"loadavg {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    print(table(all_rows))
    if len(args.ranks) > 1:
        report["fits"] = fit(report)
        print(fit_table(report["fits"]))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
