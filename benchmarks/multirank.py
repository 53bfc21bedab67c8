"""Multi-rank saves: N gloo ranks on loopback, each holding 1/N of one state.

    python -m benchmarks.run --size 1GiB --ranks 2 --ranks 4 --methods none

Every rank builds its DTensor ``Shard(0)`` pieces of the same synthetic state
(global shapes from ``state.plan_shapes``; scalars stay plain tensors,
replicated), and the methods below run interleaved, each save started by all
ranks together after a barrier:

* ``raw_parallel_write``: each rank writes its own bytes to one file + fsync
  (the floor);
* ``async_ckpt_async``: one ``AsyncCheckpointer`` per rank (process
  executor, started before the first save);
* ``dcp_async``: ``dcp.async_save`` as shipped (THREAD executor, fresh
  staging memory per save, default planner), on its own gloo group;
* ``dcp_async_cached``: the same with DCP's best options for repeated saves:
  ``DefaultSavePlanner(enable_plan_caching=True)`` and one reused
  ``DefaultStager`` with async staging.

Per save: stall (until save() returned), staged, commit (this rank's
future done) and the slowest rank's figures. "busy" runs mutate the state
again as soon as it is staged (CPU-bound training racing the write, as in
the single-process harness); "idle" runs wait (training on an accelerator). "control overhead" is the time
spent planning before the first byte is written: for async_ckpt
``SaveFuture.stats.plan_s`` (the fingerprint all-gather and plan-cache
check); for DCP the time from ``set_up_planner`` to the end of
``finish_plan`` in the background thread (local plan, plan gather, global
plan, scatter), measured with a planner subclass. Both exclude staging.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.base import Done, FuturePending, Pending, remove_path
from benchmarks.limits import _byte_view, fsync_dir
from benchmarks.metrics import now
from benchmarks.state import iter_tensors, plan_shapes

METHODS = ("raw_parallel_write", "async_ckpt_async", "dcp_async", "dcp_async_cached")
FLOOR = "raw_parallel_write"


# ---------------------------------------------------------------- the state
def build_sharded_state(total: int, mesh: Any, seed: int) -> dict[str, Any]:
    """This rank's DTensor Shard(0) pieces of the synthetic state of `total` bytes."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(seed * 1009 + rank)

    def piece(shape: tuple[int, ...], std: float) -> Any:
        local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, [Shard(0)])
        local = torch.empty(local_shape).normal_(0.0, std, generator=gen)
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride
        )

    model: dict[str, Any] = {}
    optim: dict[int, dict[str, Any]] = {}
    shapes = plan_shapes(total)
    for i, (name, shape) in enumerate(shapes):
        model[name] = piece(shape, 0.02)
        optim[i] = {
            "step": torch.tensor(float(seed)),  # replicated: same on every rank
            "exp_avg": piece(shape, 1e-3),
            "exp_avg_sq": piece(shape, 1e-3),
        }
    return {
        "model": model,
        "optim": {
            "state": optim,
            "param_groups": [{"lr": 3e-4, "params": list(range(len(shapes)))}],
        },
        "step": 0,
    }


def local_tensors(state: dict[str, Any]) -> list[torch.Tensor]:
    return [t.to_local() if hasattr(t, "to_local") else t for t in iter_tensors(state)]


@torch.no_grad()
def mutate_local(state: dict[str, Any]) -> None:
    """One fake optimizer step on this rank's pieces (no communication)."""
    state["step"] += 1
    delta = 1e-6 * (1 + state["step"] % 7)
    for t in local_tensors(state):
        t.add_(delta)


# ---------------------------------------------------------------- methods
class _Method:
    name = ""

    def setup(self) -> None:
        pass

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        raise NotImplementedError

    def run_info(self) -> dict[str, Any]:
        return {}

    def teardown(self) -> None:
        pass


class RawParallel(_Method):
    name = "raw_parallel_write"

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        path.mkdir(parents=True, exist_ok=True)
        f = path / f"rank-{dist.get_rank()}.bin"
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for t in local_tensors(state):
                view = _byte_view(t.contiguous())
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path)
        return Done()


class OursAsync(_Method):
    name = "async_ckpt_async"

    def __init__(self) -> None:
        self.ckpt: Any = None
        self.fut: Any = None
        self.start_s = 0.0

    def setup(self) -> None:
        import async_ckpt

        self.ckpt = async_ckpt.AsyncCheckpointer()  # process executor, the default group
        t0 = now()
        self.ckpt.start()
        self.start_s = now() - t0

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        self.fut = self.ckpt.save(state, checkpoint_id=str(path))
        return FuturePending(self.fut, self.fut.staged)

    def run_info(self) -> dict[str, Any]:
        st = self.fut.stats
        return {
            "plan_s": st.plan_s,
            "write_s": st.write_s,
            "lib_commit_s": st.commit_s,
            "plan_reused": float(st.plan_reused),
            "start_s": self.start_s,
        }

    def teardown(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()


def _timed_planner(cached: bool) -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class TimedPlanner(DefaultSavePlanner):
        """Records when planning starts and when this rank's final plan is known."""

        t_start = 0.0
        t_end = 0.0

        def set_up_planner(
            self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False
        ) -> None:
            self.t_start = now()
            super().set_up_planner(state_dict, storage_meta, is_coordinator)

        def finish_plan(self, new_plan: Any) -> Any:
            plan = super().finish_plan(new_plan)
            self.t_end = now()
            return plan

    return TimedPlanner(enable_plan_caching=cached)


class DcpAsyncMR(_Method):
    def __init__(self, cached: bool) -> None:
        self.cached = cached
        self.name = "dcp_async_cached" if cached else "dcp_async"
        self.pg: Any = None
        self.stager: Any = None
        self.planner: Any = None
        self._owned: Any = None

    def setup(self) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        # DCP's background thread runs collectives; give it its own group so the
        # harness's barriers on the default group never interleave with them.
        self.pg = dist.new_group(backend="gloo")
        if self.cached:
            self.stager = DefaultStager(StagingOptions(False, False, True, False))

    def save(self, state: dict[str, Any], path: Path) -> Pending:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

        self.planner = _timed_planner(self.cached)
        stager = self.stager
        if stager is None:  # what async_save does by default, kept so we can close it
            stager = self._owned = DefaultStager(StagingOptions(False, False, False, False))
        resp = dcp.async_save(
            state,
            checkpoint_id=str(path),
            process_group=self.pg,
            planner=self.planner,
            async_stager=stager,
        )
        if isinstance(resp, AsyncSaveResponse):
            return FuturePending(resp.upload_completion, resp.staging_completion)
        return FuturePending(resp)

    def run_info(self) -> dict[str, Any]:
        if self._owned is not None:
            self._owned.close()
            self._owned = None
        return {"plan_s": self.planner.t_end - self.planner.t_start}

    def teardown(self) -> None:
        if self.stager is not None:
            self.stager.close()


def _make(name: str) -> _Method:
    return {
        "raw_parallel_write": RawParallel,
        "async_ckpt_async": OursAsync,
        "dcp_async": lambda: DcpAsyncMR(False),
        "dcp_async_cached": lambda: DcpAsyncMR(True),
    }[name]()


# ---------------------------------------------------------------- one rank
def _rank_main(
    rank: int,
    world: int,
    port: int,
    total: int,
    repeats: int,
    root: str,
    seed: int,
    out: str,
    busy: bool,
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"  # for async_ckpt's worker group address
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", message=".*overwriting.*")
    timeout = datetime.timedelta(seconds=600)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"bench-mr-{world}", store),
        rank=rank,
        world_size=world,
        timeout=timeout,
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    state = build_sharded_state(total, mesh, seed)
    local_bytes = sum(t.nbytes for t in local_tensors(state))
    methods = [_make(n) for n in METHODS]
    result: dict[str, Any] = {"world": world, "methods": {m.name: {"saves": []} for m in methods}}
    for m in methods:
        m.setup()
    base = Path(root)
    for r in range(repeats):
        for m in methods:
            path = base / f"{m.name}.r{r}"
            mutate_local(state)
            dist.barrier()
            err = ""
            t0 = now()
            try:
                pending = m.save(state, path)
                t1 = now()
                pending.wait_staged()
                t2 = now()
                if busy:
                    mutate_local(state)  # CPU-bound training goes on during the write
                pending.wait_committed()
                t3 = now()
                rec = {"return_s": t1 - t0, "staged_s": t2 - t0, "commit_s": t3 - t0}
                rec.update(m.run_info())
            except Exception:
                err = traceback.format_exc()
                rec = {}
            dist.barrier()
            rec["all_committed_s"] = now() - t0
            per_rank = [None] * world
            dist.all_gather_object(per_rank, (rec, err))
            if rank == 0:
                errors = [e for _, e in per_rank if e]
                entry: dict[str, Any] = {"per_rank": [x for x, _ in per_rank]}
                if errors:
                    entry["error"] = errors[0]
                result["methods"][m.name]["saves"].append(entry)
                remove_path(path)
            dist.barrier()
    for m in methods:
        m.teardown()
    all_bytes = [0] * world
    dist.all_gather_object(all_bytes, local_bytes)
    if rank == 0:
        result["bytes_per_rank"] = all_bytes
        result["nbytes"] = sum(all_bytes)
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- driver
def _stat(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    steady = values[1:] if len(values) > 1 else values
    return {
        "median": statistics.median(steady),
        "min": min(steady),
        "max": max(steady),
        "first": values[0],
        "n": len(steady),
    }


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Per method: each save's slowest rank, then median/min/max over saves 2..N."""
    out: dict[str, Any] = {}
    for name, m in raw["methods"].items():
        saves = [s for s in m["saves"] if "error" not in s]
        errors = [s["error"] for s in m["saves"] if "error" in s]
        keys = ("return_s", "staged_s", "commit_s", "all_committed_s", "plan_s", "lib_commit_s")
        summ = {}
        for k in keys:
            vals = [max(r[k] for r in s["per_rank"]) for s in saves if k in s["per_rank"][0]]
            if vals:
                summ[k] = _stat(vals)
        # The slowest rank's plan time includes waiting for the last rank to finish
        # staging; the fastest rank's (the last to arrive) is the exchange itself.
        vals = [
            min(r["plan_s"] for r in s["per_rank"]) for s in saves if "plan_s" in s["per_rank"][0]
        ]
        if vals:
            summ["plan_min_rank_s"] = _stat(vals)
        out[name] = {"summary": summ, "errors": errors[:1], "n_failed": len(errors)}

    def med(name: str, key: str) -> float | None:
        s = out.get(name, {}).get("summary", {}).get(key)
        return s["median"] if s else None

    floor = med(FLOOR, "all_committed_s")
    for name in out:
        c = med(name, "all_committed_s")
        out[name]["commit_vs_parallel_write"] = c / floor if c and floor else None
    for key in ("plan_s", "plan_min_rank_s"):
        ours = med("async_ckpt_async", key)
        for dcp_name in ("dcp_async", "dcp_async_cached"):
            d = med(dcp_name, key)
            out.setdefault(dcp_name, {})[f"ours_{key}_vs_this"] = ours / d if ours and d else None
    return out


def run(
    total: int, world: int, repeats: int, scratch: Path, seed: int = 0, busy: bool = True
) -> dict[str, Any]:
    """Spawn `world` ranks, run every method `repeats` times, summarise.

    busy: each rank mutates its state again as soon as it is staged (CPU-bound
    training racing the write); otherwise the ranks wait idle (training on an
    accelerator), which shows the control traffic without CPU contention.
    """
    import torch.multiprocessing as mp

    root = scratch / f"ranks{world}-{'busy' if busy else 'idle'}"
    root.mkdir(parents=True, exist_ok=True)
    out = root / "result.json"
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    t0 = time.perf_counter()
    try:
        ctx = mp.start_processes(
            _rank_main,
            args=(world, store.port, total, repeats, str(root), seed, str(out), busy),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + 3600
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world} ranks did not finish within an hour")
        raw = json.loads(out.read_text())
    finally:
        del store
        remove_path(root)
    raw["wall_s"] = time.perf_counter() - t0
    raw["repeats"] = repeats
    raw["busy"] = busy
    raw["summary"] = summarize(raw)
    return raw


def one_line(r: dict[str, Any]) -> str:
    s = r["summary"]
    parts = []
    for name, m in s.items():
        c = m.get("summary", {}).get("all_committed_s")
        p = m.get("summary", {}).get("plan_s")
        txt = f"{name} commit {c['median']:.2f}s" if c else f"{name} failed"
        if p:
            txt += f" plan {p['median'] * 1e3:.1f}ms"
        parts.append(txt)
    return "; ".join(parts)


if __name__ == "__main__":  # python -m benchmarks.multirank WORLD [SIZE_BYTES]
    w = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 64 << 20
    res = run(size, w, 3, Path(".bench-tmp"))
    print(json.dumps(res["summary"], indent=2))
    print(one_line(res))
