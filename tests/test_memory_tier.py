"""The memory tier (docs/memory-tier.md): snapshots in shared memory, replicated to a peer
on another node, restored from the fastest good copy.

The multi-rank tests run one training job of 4 gloo ranks as 2 simulated nodes
of 2 ranks (each node has its own memory root), then restart it after what a
real failure leaves behind: a node's memory gone, a replica cut short, a
damaged snapshot.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from async_ckpt.dist.dir_transfer import PARTIAL_SUFFIX
from async_ckpt.errors import CheckpointError, CheckpointNotFoundError
from async_ckpt.manager import CheckpointManager
from async_ckpt.manager.memory_restore import (
    Fetch,
    fetch_rounds,
    fetches,
    newest_common_step,
)
from async_ckpt.manager.memory_store import Inventory, MemoryStore, default_memory_root

WORLD, PER_NODE, ROWS, COLS = 4, 2, 8, 64
STEPS, SAVE_EVERY = 6, 4  # storage holds step 4; the memory tier steps 5 and 6


def _node_root(tmp: str, rank: int) -> str:
    return os.path.join(tmp, f"node{rank // PER_NODE}")


def _expected_table(step: int) -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) * 0.5 + step


def _job_state(rank: int, step: int) -> dict[str, Any]:
    """What a rank holds after ``step``: a row-sharded DTensor, a replicated module and
    optimizer (Stateful objects), and plain values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(step):
        model(torch.ones(2, 4)).sum().backward()
        optim.step()
        optim.zero_grad()
    return {
        "table": distribute_tensor(_expected_table(step), mesh, [Shard(0)]),
        "model": model,
        "optim": optim,
        "step": step,
    }


def _manager(tmp: str, rank: int, memory: bool = True, keep: int = 2) -> CheckpointManager:
    memory_args: dict[str, Any] = (
        {"memory_every": 1, "memory_root": _node_root(tmp, rank), "memory_keep": keep}
        if memory
        else {}
    )
    return CheckpointManager(
        os.path.join(tmp, "storage"),
        save_every=SAVE_EVERY,
        executor="thread",
        ranks_per_node=PER_NODE,
        **memory_args,
    )


def _train_body(rank: int, world: int, tmp: str) -> dict[str, Any]:
    manager = _manager(tmp, rank)
    for step in range(1, STEPS + 1):
        manager.maybe_save(step, _job_state(rank, step))
    manager.wait()
    assert manager._memory is not None
    manager._memory.wait()  # the last snapshot and its replication are done
    torch.distributed.barrier()  # on every rank: no transfer is in flight when node 1 dies
    if rank // PER_NODE == 1:  # node 1 crashes: its processes die, no clean-up runs
        os.kill(os.getpid(), signal.SIGKILL)
    report = {"replicates": manager._memory.replicates, "storage": manager.steps()}
    manager.close()
    return report


def _restore_body(rank: int, world: int, tmp: str, memory: bool) -> dict[str, Any]:
    state = _job_state(rank, 0)
    manager = _manager(tmp, rank, memory=memory)
    step = manager.restore(state)
    info = manager.last_restore
    assert info is not None
    want = _job_state(rank, step)
    same = (
        torch.equal(state["table"].to_local(), want["table"].to_local())
        and all(
            torch.equal(a, b)
            for a, b in zip(
                state["model"].state_dict().values(),
                want["model"].state_dict().values(),
                strict=True,
            )
        )
        and torch.equal(
            state["optim"].state_dict()["state"][0]["momentum_buffer"],
            want["optim"].state_dict()["state"][0]["momentum_buffer"],
        )
        and state["step"] == step
    )
    manager.close()
    return {"step": step, "source": info.source, "holder": info.holder, "bit_exact": same}


@pytest.fixture(scope="module")
def trained_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of the 4-rank job that node 1's crash ended: storage at step 4, memory at
    steps 5 and 6 (node 0's ranks closed cleanly, node 1's were killed)."""
    from dist_utils import run_ranks

    tmp = tmp_path_factory.mktemp("memory-job")
    reports = run_ranks(_train_body, WORLD, str(tmp), reporting=PER_NODE)
    assert all(r["replicates"] for r in reports[:PER_NODE])
    assert reports[0]["storage"] == [SAVE_EVERY]
    assert reports[PER_NODE:] == [None] * PER_NODE  # killed
    return tmp


def _copy_job(trained: Path, tmp_path: Path) -> Path:
    job = tmp_path / "job"
    shutil.copytree(trained, job)
    return job


def _restore(job: Path, memory: bool = True) -> list[dict[str, Any]]:
    from dist_utils import run_ranks

    return run_ranks(_restore_body, WORLD, str(job), memory)


def test_each_rank_holds_its_own_snapshots_and_its_ring_predecessors_replicas(
    trained_job: Path,
) -> None:
    for rank in range(WORLD):
        store = MemoryStore(_node_root(str(trained_job), rank), rank, WORLD)
        inventory = store.inventory()
        assert inventory.own == (5, 6)  # memory_keep=2: steps 1-4 were pruned
        source = (rank - PER_NODE) % WORLD  # the same local rank on the other node
        assert inventory.replicas[source] == (5, 6)
        other = (source + 1) % PER_NODE + (source // PER_NODE) * PER_NODE
        assert inventory.replicas[other] == (5, 6)  # held by the node's other rank


def test_node_loss_restores_lost_ranks_from_replicas_bit_exact(
    trained_job: Path, tmp_path: Path
) -> None:
    job = _copy_job(trained_job, tmp_path)
    shutil.rmtree(job / "node1")  # every process of node 1 gone, and its shared memory
    results = _restore(job)
    assert [r["step"] for r in results] == [STEPS] * WORLD  # newer than storage's step 4
    assert all(r["bit_exact"] for r in results)
    assert all(r["source"] == "replica" for r in results)
    assert [r["holder"] for r in results] == [None, None, 0, 1]


def test_trainer_crash_restores_every_rank_from_its_own_copy(
    trained_job: Path, tmp_path: Path
) -> None:
    job = _copy_job(trained_job, tmp_path)
    results = _restore(job)
    assert [(r["step"], r["source"], r["bit_exact"]) for r in results] == [
        (STEPS, "memory", True)
    ] * WORLD


def test_incomplete_replica_of_the_newest_step_falls_back_to_the_previous_one(
    trained_job: Path, tmp_path: Path
) -> None:
    job = _copy_job(trained_job, tmp_path)
    shutil.rmtree(job / "node1")
    # node 1 died while rank 2's step 6 was being sent to rank 0
    replica = MemoryStore(str(job / "node0"), 0, WORLD).replica_step(2, STEPS)
    os.unlink(os.path.join(replica, "metadata.json"))
    os.rename(replica, replica + PARTIAL_SUFFIX)
    results = _restore(job)
    assert [(r["step"], r["source"], r["bit_exact"]) for r in results] == [
        (STEPS - 1, "replica", True)
    ] * WORLD


def test_no_complete_replica_newer_than_storage_restores_from_storage(
    trained_job: Path, tmp_path: Path
) -> None:
    job = _copy_job(trained_job, tmp_path)
    shutil.rmtree(job / "node1")
    for step in (STEPS - 1, STEPS):
        shutil.rmtree(MemoryStore(str(job / "node0"), 0, WORLD).replica_step(2, step))
    results = _restore(job)
    assert [(r["step"], r["source"], r["bit_exact"]) for r in results] == [
        (SAVE_EVERY, "storage", True)
    ] * WORLD


def test_damaged_snapshot_fails_its_checksum_and_every_rank_uses_storage(
    trained_job: Path, tmp_path: Path
) -> None:
    job = _copy_job(trained_job, tmp_path)
    for step in (STEPS - 1, STEPS):
        path = MemoryStore(str(job / "node1"), 3, WORLD).own_step(step)
        data = next(n for n in os.listdir(path) if n.endswith(".data"))
        with open(os.path.join(path, data), "r+b") as f:
            f.seek(8)
            byte = f.read(1)
            f.seek(8)
            f.write(bytes([byte[0] ^ 0xFF]))
    results = _restore(job)
    # step 6 was loadable from memory on every rank but rank 3, whose copy is damaged:
    # the ranks agree on storage rather than mixing steps
    assert [(r["step"], r["source"], r["bit_exact"]) for r in results] == [
        (SAVE_EVERY, "storage", True)
    ] * WORLD


def test_memory_tier_disabled_restores_from_storage_as_before(
    trained_job: Path, tmp_path: Path
) -> None:
    job = _copy_job(trained_job, tmp_path)
    results = _restore(job, memory=False)
    assert [(r["step"], r["source"], r["bit_exact"]) for r in results] == [
        (SAVE_EVERY, "storage", True)
    ] * WORLD


# --------------------------------------------------------------------- one process
def _one_state(step: int) -> dict[str, Any]:
    return {"w": torch.full((1000,), float(step)), "step": step}


def test_single_process_memory_tier_with_the_process_executor(tmp_path: Path) -> None:
    root, memory = str(tmp_path / "storage"), str(tmp_path / "memory")
    with CheckpointManager(root, save_every=3, memory_every=1, memory_root=memory) as manager:
        for step in range(1, 6):
            manager.maybe_save(step, _one_state(step))
    assert MemoryStore(memory, 0, 1).inventory() == Inventory((4, 5), {})
    with CheckpointManager(root, save_every=3, memory_every=1, memory_root=memory) as manager:
        state = _one_state(0)
        assert manager.restore(state) == 5
        assert manager.last_restore is not None and manager.last_restore.source == "memory"
        assert torch.equal(state["w"], _one_state(5)["w"]) and state["step"] == 5
        # an explicit step the memory tier lacks comes from storage
        assert manager.restore(state, step=3) == 3
        assert manager.last_restore.source == "storage" and state["step"] == 3


def test_restarted_run_prunes_the_abandoned_newer_snapshots(tmp_path: Path) -> None:
    root, memory = str(tmp_path / "storage"), str(tmp_path / "memory")
    kw: dict[str, Any] = {"save_every": 2, "memory_every": 1, "memory_root": memory}
    with CheckpointManager(root, executor="thread", **kw) as manager:
        for step in range(1, 8):
            manager.maybe_save(step, _one_state(step))
    # a new run restarts from step 2 on purpose (say, to change the data order)
    with CheckpointManager(root, executor="thread", **kw) as manager:
        state = _one_state(0)
        manager.restore(state, step=2)
        for step in (3, 4):
            manager.maybe_save(step, _one_state(step))
    assert MemoryStore(memory, 0, 1).inventory().own == (3, 4)


def test_memory_only_checkpoint_restores_without_storage(tmp_path: Path) -> None:
    root, memory = str(tmp_path / "storage"), str(tmp_path / "memory")
    with CheckpointManager(root, memory_every=1, memory_root=memory, executor="thread") as m:
        m.save_to_memory(7, _one_state(7))
    with CheckpointManager(root, memory_every=1, memory_root=memory, executor="thread") as m:
        assert m.latest_step() is None  # storage only
        state = _one_state(0)
        assert m.restore(state) == 7 and state["step"] == 7
        m.clear_memory()
        with pytest.raises(CheckpointNotFoundError):
            m.restore(state)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_every": 0},
        {"memory_every": 4, "save_every": 2},
        {"memory_every": 1, "memory_keep": 0},
        {"memory_every": 1, "ranks_per_node": -1},
    ],
)
def test_bad_memory_options_are_refused(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(CheckpointError):
        CheckpointManager(str(tmp_path), executor="thread", **kwargs)


def test_default_memory_root_is_per_storage_root_in_shared_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = default_memory_root("/data/run-a"), default_memory_root("/data/run-b")
    assert a != b and a == default_memory_root("/data/run-a")
    # a relative root means the directory it names: the same job however it is spelled,
    # and two jobs that both say "ckpt" in different directories do not share one
    (tmp_path / "job1").mkdir()
    (tmp_path / "job2").mkdir()
    monkeypatch.chdir(tmp_path / "job1")
    here = default_memory_root("ckpt")
    assert here == default_memory_root(str(tmp_path / "job1" / "ckpt"))
    assert here == default_memory_root("./ckpt/")
    monkeypatch.chdir(tmp_path / "job2")
    assert default_memory_root("ckpt") != here
    if os.path.isdir("/dev/shm") and "ASYNC_CKPT_MEMORY_DIR" not in os.environ:
        assert a.startswith("/dev/shm/")


# ----------------------------------------------------------------- restore decisions
def test_newest_common_step_needs_every_rank_covered() -> None:
    node0 = [Inventory((5, 6), {2: (5, 6)}), Inventory((5, 6), {3: (5,)})]
    lost = [Inventory(), Inventory()]  # node 1 is gone
    inventories = node0 + lost
    assert newest_common_step(inventories) == 5  # rank 3's step 6 has no replica
    assert fetches(inventories, 5) == [Fetch(2, 0), Fetch(3, 1)]
    assert newest_common_step(inventories, step=6) is None
    assert newest_common_step([Inventory((1,)), Inventory()]) is None


def test_fetch_rounds_send_at_most_one_directory_per_rank_per_round() -> None:
    plan = [Fetch(1, 0), Fetch(2, 0), Fetch(3, 4)]
    assert fetch_rounds(plan) == [[Fetch(1, 0), Fetch(3, 4)], [Fetch(2, 0)]]


def test_cli_lists_and_clears_the_memory_tier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from async_ckpt.cli import main

    root, memory = str(tmp_path / "storage"), str(tmp_path / "memory")
    with CheckpointManager(root, memory_every=1, memory_root=memory, executor="thread") as m:
        for step in (1, 2, 3):
            m.save_to_memory(step, _one_state(step))
    assert main(["memory", root, "--memory-root", memory]) == 0
    listing = capsys.readouterr().out
    assert "world-1/rank-0: steps 2, 3" in listing
    assert main(["memory", root, "--memory-root", memory, "--clear"]) == 0
    assert not os.path.exists(memory)
    assert main(["memory", root, "--memory-root", memory]) == 0
    assert "no memory tier" in capsys.readouterr().out


def _out_of_step_body(rank: int, world: int, tmp: str) -> dict[str, Any]:
    from async_ckpt.errors import StateDictError

    node = os.path.join(tmp, f"node{rank}")
    manager = CheckpointManager(
        os.path.join(tmp, "storage"),
        memory_every=1,
        memory_root=node,
        ranks_per_node=1,
        executor="thread",
    )
    refused = False
    for step in (1, 2, 3):
        state = _one_state(step)
        if rank == 1 and step == 2:  # a state this rank cannot save, at this step only
            state["bad"] = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
        try:
            manager.save_to_memory(step, state)
        except StateDictError:
            refused = True
    manager.wait()
    assert manager._memory is not None
    manager._memory.wait()
    replicas = manager._memory.store.inventory().replicas.get(1 - rank, ())
    held = {}
    for step in replicas:  # what each replica holds, read back as that peer's state
        target = _one_state(0)
        import async_ckpt

        async_ckpt.load(
            target, checkpoint_id=manager._memory.store.replica_step(1 - rank, step), no_dist=True
        )
        held[step] = target["step"]
    report = {"refused": refused, "replicates": manager._memory.replicates, "held": held}
    manager.close()
    return report


def test_a_save_refused_on_one_rank_keeps_the_replicas_in_step(tmp_path: Path) -> None:
    from dist_utils import run_ranks

    reports = run_ranks(_out_of_step_body, 2, str(tmp_path))
    assert [r["refused"] for r in reports] == [False, True]
    assert all(r["replicates"] for r in reports)
    # rank 1 had no step 2; what rank 0 holds as its step 3 is its step 3
    assert reports[0]["held"] == {1: 1, 3: 3}
    assert reports[1]["held"] == {2: 2, 3: 3}


def _unequal_nodes_body(rank: int, world: int, tmp: str) -> bool:
    manager = CheckpointManager(
        os.path.join(tmp, "storage"),
        memory_every=1,
        memory_root=os.path.join(tmp, f"node{rank}"),
        ranks_per_node=1 + rank,  # the ranks disagree on the node layout
        executor="thread",
    )
    manager.save_to_memory(1, _one_state(1)).result()
    assert manager._memory is not None
    replicates = manager._memory.replicates
    manager.close()
    return replicates


def test_ranks_that_disagree_on_the_node_layout_keep_local_snapshots_only(
    tmp_path: Path,
) -> None:
    from dist_utils import run_ranks

    assert run_ranks(_unequal_nodes_body, 2, str(tmp_path)) == [False, False]


def test_first_snapshot_after_restarting_from_older_storage_drops_the_abandoned_ones(
    tmp_path: Path,
) -> None:
    root, memory = str(tmp_path / "storage"), str(tmp_path / "memory")
    kw: dict[str, Any] = {"save_every": 2, "memory_every": 1, "memory_root": memory}
    with CheckpointManager(root, executor="thread", **kw) as manager:
        for step in range(1, 8):
            manager.maybe_save(step, _one_state(step))
    assert MemoryStore(memory, 0, 1).inventory().own == (6, 7)
    with CheckpointManager(root, executor="thread", **kw) as manager:
        manager.restore(_one_state(0), step=2)  # from storage, on purpose
        manager.save_to_memory(3, _one_state(3)).result()
    # at most memory_keep snapshots, none of the abandoned run's: a crash now resumes at 3
    assert MemoryStore(memory, 0, 1).inventory().own == (3,)
    with CheckpointManager(root, executor="thread", **kw) as manager:
        state = _one_state(0)
        assert manager.restore(state) == 6  # storage's newest is 6, newer than memory's 3


def test_memory_snapshots_stage_with_the_managers_staging_options(tmp_path: Path) -> None:
    from async_ckpt import Stager

    stager = Stager(async_staging=True, num_buffers=2)
    with CheckpointManager(
        str(tmp_path / "storage"),
        memory_every=1,
        memory_root=str(tmp_path / "memory"),
        executor="thread",
        stager=stager,
    ) as manager:
        assert manager._memory is not None
        options = manager._memory.checkpointer.stager.options
        assert options.async_staging and options.num_buffers == 2
        assert manager._memory.checkpointer.stager is not stager  # a buffer of its own
        manager.save_to_memory(1, _one_state(1)).result()
        state = _one_state(0)
        assert manager.restore(state) == 1 and state["step"] == 1
