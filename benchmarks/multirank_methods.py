"""Multi-rank benchmark: what every rank saves, and the save methods compared.

Every rank builds its DTensor ``Shard(0)`` pieces of the same synthetic state
(global shapes from ``state.plan_shapes``; scalars stay plain tensors,
replicated). The methods:

* ``raw_parallel_write``: each rank writes its own bytes to one file + fsync
  (the floor);
* ``async_ckpt_async``: one ``AsyncCheckpointer`` per rank (process
  executor, started before the first save);
* ``async_ckpt_async_staging``: the same with ``async_staging=True``;
* ``dcp_async``: ``dcp.async_save`` as shipped (THREAD executor, fresh
  staging memory per save, default planner), on its own gloo group;
* ``dcp_async_cached``: the same with DCP's best options for repeated saves:
  ``DefaultSavePlanner(enable_plan_caching=True)`` and one reused
  ``DefaultStager`` with async staging.

``run_info`` after each save gives the method's own figures, among them
``plan_s``, the control overhead (see ``benchmarks.multirank``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.base import Done, FuturePending, Pending
from benchmarks.limits import _byte_view, fsync_dir
from benchmarks.metrics import now
from benchmarks.peers import dcp_pending
from benchmarks.state import iter_tensors, plan_shapes

METHODS = (
    "raw_parallel_write",
    "async_ckpt_async",
    "async_ckpt_async_staging",
    "dcp_async",
    "dcp_async_cached",
)
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

    def __init__(self, async_staging: bool = False) -> None:
        self.ckpt: Any = None
        self.fut: Any = None
        self.start_s = 0.0
        self.async_staging = async_staging
        self.name = "async_ckpt_async_staging" if async_staging else "async_ckpt_async"

    def setup(self) -> None:
        import async_ckpt

        stager = async_ckpt.Stager(async_staging=self.async_staging)
        # process executor, the default group
        self.ckpt = async_ckpt.AsyncCheckpointer(stager=stager)
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
            self.ckpt.stager.close()


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
        return dcp_pending(resp)

    def run_info(self) -> dict[str, Any]:
        if self._owned is not None:
            self._owned.close()
            self._owned = None
        return {"plan_s": self.planner.t_end - self.planner.t_start}

    def teardown(self) -> None:
        if self.stager is not None:
            self.stager.close()


def make_method(name: str) -> _Method:
    """A fresh instance of the method called ``name`` (one of METHODS)."""
    return {
        "raw_parallel_write": RawParallel,
        "async_ckpt_async": OursAsync,
        "async_ckpt_async_staging": lambda: OursAsync(async_staging=True),
        "dcp_async": lambda: DcpAsyncMR(False),
        "dcp_async_cached": lambda: DcpAsyncMR(True),
    }[name]()
