"""async_ckpt.integrations.accelerate against the real accelerate package (CPU)."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DistributedType, ProjectConfiguration  # noqa: E402
from dist_utils import run_ranks  # noqa: E402

import async_ckpt  # noqa: E402
from async_ckpt.integrations import accelerate as ac_acc  # noqa: E402
from async_ckpt.integrations.accelerate import AcceleratorCheckpointer  # noqa: E402


def _reset_accelerate() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate() -> Iterator[None]:
    """Accelerate keeps its state in process-wide singletons: each test starts afresh."""
    _reset_accelerate()
    yield
    _reset_accelerate()


class Counter:
    """An object registered with ``register_for_checkpointing``."""

    def __init__(self) -> None:
        self.n = 0
        self.history = torch.zeros(3)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "history": self.history.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = state["n"]
        self.history = state["history"].clone()


class Opaque:
    """Not allow-listed: async_ckpt refuses to save it."""


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build(seed: int = 0, **accelerator_kwargs: Any) -> SimpleNamespace:
    """An accelerator with a prepared model (dropout: forward draws from torch's RNG),
    AdamW, a scheduler and a registered counter."""
    acc = Accelerator(cpu=True, **accelerator_kwargs)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    model, opt, sched = acc.prepare(model, opt, sched)
    counter = Counter()
    acc.register_for_checkpointing(counter)
    return SimpleNamespace(acc=acc, model=model, opt=opt, sched=sched, counter=counter)


def _train_step(t: SimpleNamespace) -> None:
    """One step that draws from python's, numpy's and torch's generators."""
    with t.acc.accumulate(t.model):
        scale = random.gauss(1.0, 0.1) * float(np.random.uniform(0.5, 1.5))
        x = torch.randn(5, 6) * scale
        loss = t.model(x).pow(2).mean()
        t.acc.backward(loss)
        t.opt.step()
        t.sched.step()
        t.opt.zero_grad()
    t.counter.n += 1
    t.counter.history += loss.detach()


def _draws() -> tuple[Any, ...]:
    """The next random numbers of every generator accelerate saves (consumes them)."""
    return (torch.rand(4).tolist(), np.random.rand(3).tolist(), random.random(), random.gauss(0, 1))


def _params(t: SimpleNamespace) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.acc.unwrap_model(t.model).parameters()]


def _opt_state(t: SimpleNamespace) -> dict[str, Any]:
    sd = t.opt.state_dict()
    return {
        k: {name: v.clone() if torch.is_tensor(v) else v for name, v in s.items()}
        for k, s in sd["state"].items()
    }


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _keys(checkpoint: Path) -> set[str]:
    return set(json.loads((checkpoint / "metadata.json").read_text())["entries"])


# --------------------------------------------------------------------- one process


def test_save_modify_load_restores_everything(tmp_path: Path, ckpt) -> None:
    t = _build()
    _seed_all(1)
    for _ in range(3):
        _train_step(t)
    assert random.getstate()[2] is not None  # a cached gaussian (gauss_next) is saved too
    path = tmp_path / "c"
    with AcceleratorCheckpointer(t.acc, checkpointer=ckpt) as ac:
        fut = ac.save_state(path)
        assert t.acc.save_iteration == 1  # as accelerate: one more after every save
        fut.result()
        params, opt_state = _params(t), _opt_state(t)
        sched_state, step = t.sched.state_dict(), t.acc.step
        counter = (t.counter.n, t.counter.history.clone())
        expected = _draws()
        for _ in range(3):  # everything moves on
            _train_step(t)
        t.counter.n = 99
        assert not _equal(_params(t), params)
        assert t.sched.state_dict() != sched_state
        assert t.acc.step == 6
        result = ac.load_state(path)
    assert result.missing_keys == []
    assert _equal(_params(t), params)
    got = _opt_state(t)
    assert got.keys() == opt_state.keys()
    for k in got:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got[k][name], opt_state[k][name])
    assert t.sched.state_dict() == sched_state
    assert t.acc.step == step == 3
    assert t.counter.n == counter[0] == 3 and torch.equal(t.counter.history, counter[1])
    assert _draws() == expected  # the next random numbers are those after the save
    keys = _keys(path)
    assert {"step", "iteration", "rng.rank0.torch", "rng.rank0.numpy.1"} <= keys
    assert "models.0.0.weight" in keys and "custom.0.n" in keys


def test_accelerator_step_restored(tmp_path: Path, ckpt) -> None:
    """``accelerator.step`` counts micro-steps under gradient accumulation."""
    t = _build(gradient_accumulation_steps=4)
    for _ in range(3):
        _train_step(t)
    assert t.acc.step == 3
    with AcceleratorCheckpointer(t.acc, checkpointer=ckpt) as ac:
        ac.save_state(tmp_path / "c").result()
        _train_step(t)
        assert t.acc.step == 4
        ac.load_state(tmp_path / "c")
    assert t.acc.step == 3


def _run(checkpoint: Path, ckpt, resume: bool, perturb: bool = False) -> list[torch.Tensor]:
    """Train 6 steps saving after the 3rd; or, resuming, load and train the last 3."""
    _reset_accelerate()
    t = _build(seed=7 if resume else 0)  # a resumed run starts from other weights
    with AcceleratorCheckpointer(t.acc, checkpointer=ckpt) as ac:
        if resume:
            ac.load_state(checkpoint)
            if perturb:
                torch.manual_seed(123)  # the control: one generator not restored
        else:
            _seed_all(5)
        for i in range(3 if resume else 0, 6):
            _train_step(t)
            if not resume and i == 2:
                ac.save_state(checkpoint)  # training goes on while it is written
        ac.wait()
    return [*_params(t), t.counter.history.clone(), torch.tensor(t.sched.get_last_lr())]


def test_training_resumes_bit_identically(tmp_path: Path, ckpt) -> None:
    path = tmp_path / "c"
    straight = _run(path, ckpt, resume=False)
    assert _equal(_run(path, ckpt, resume=True), straight)
    # the control: the same resume with torch's generator elsewhere diverges
    assert not _equal(_run(path, ckpt, resume=True, perturb=True), straight)


def _shuffled(seed: int) -> tuple[Accelerator, Any]:
    from accelerate.utils import DataLoaderConfiguration

    torch.manual_seed(seed)  # the SeedableRandomSampler's initial seed
    acc = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    data = torch.utils.data.DataLoader(torch.arange(12), batch_size=4, shuffle=True)
    return acc, acc.prepare(data)


def test_dataloader_epoch_and_sampler_seed_restored(tmp_path: Path, ckpt) -> None:
    acc, data = _shuffled(seed=1)
    [b.tolist() for b in data]  # one epoch done
    with AcceleratorCheckpointer(acc, checkpointer=ckpt) as ac:
        ac.save_state(tmp_path / "c").result()
    expected = [b.tolist() for b in data]  # the order of the second epoch
    _reset_accelerate()
    # the sampler seeds each epoch with initial seed + epoch: 7 + 0 is not 1 + 1
    assert [b.tolist() for b in _shuffled(seed=7)[1]] != expected
    acc, data = _shuffled(seed=7)  # a new run: another seed, at epoch 0
    with AcceleratorCheckpointer(acc, checkpointer=ckpt) as ac:
        ac.load_state(tmp_path / "c")
    assert data.iteration == 1
    assert [b.tolist() for b in data] == expected
    keys = _keys(tmp_path / "c")
    assert {"dataloaders.0.iteration", "dataloaders.0.sampler.initial_seed"} <= keys


def test_register_for_checkpointing_must_match(tmp_path: Path, ckpt) -> None:
    t = _build()
    with AcceleratorCheckpointer(t.acc, checkpointer=ckpt) as ac:
        ac.save_state(tmp_path / "c").result()
        other = Counter()
        t.acc.register_for_checkpointing(other)  # one more than saved
        with pytest.raises(async_ckpt.KeyMismatchError, match="custom object"):
            ac.load_state(tmp_path / "c")
        t.acc._custom_objects.clear()  # one fewer than saved
        with pytest.raises(async_ckpt.KeyMismatchError, match="custom object"):
            ac.load_state(tmp_path / "c")
    # register_for_checkpointing refuses objects without state_dict, as before
    with pytest.raises(ValueError):
        t.acc.register_for_checkpointing(Opaque())


def test_custom_object_with_unsafe_state_fails_at_save(tmp_path: Path, ckpt) -> None:
    t = _build()
    holder = SimpleNamespace(state_dict=lambda: {"thing": Opaque()}, load_state_dict=print)
    t.acc.register_for_checkpointing(holder)
    with AcceleratorCheckpointer(t.acc, checkpointer=ckpt) as ac:
        with pytest.raises(async_ckpt.UnsafeObjectError):
            ac.save_state(tmp_path / "c")
    assert not (tmp_path / "c" / "metadata.json").exists()


def test_pre_hooks_see_models_and_may_take_them_over(tmp_path: Path, ckpt) -> None:
    t = _build()
    seen: dict[str, Any] = {}

    def save_hook(models, weights, output_dir):
        seen["save"] = (len(models), sorted(weights[0]), output_dir)
        torch.save(weights.pop(), os.path.join(output_dir, "my_model.pt"))  # saved by the hook

    def load_hook(models, input_dir):
        seen["load"] = input_dir
        model = models.pop()
        model.load_state_dict(torch.load(os.path.join(input_dir, "my_model.pt")))

    t.acc.register_save_state_pre_hook(save_hook)
    t.acc.register_load_state_pre_hook(load_hook)
    path = tmp_path / "c"
    with AcceleratorCheckpointer(t.acc, checkpointer=ckpt) as ac:
        ac.save_state(path).result()
        params = _params(t)
        _train_step(t)
        ac.load_state(path)
    assert seen["save"] == (1, ["0.bias", "0.weight", "3.bias", "3.weight"], str(path))
    assert seen["load"] == str(path)
    assert not any(k.startswith("models.0") for k in _keys(path))
    assert _equal(_params(t), params)


def test_automatic_naming_and_total_limit(tmp_path: Path, ckpt) -> None:
    config = ProjectConfiguration(
        project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=2
    )
    t = _build(project_config=config)
    root = tmp_path / "checkpoints"
    with AcceleratorCheckpointer(t.acc, checkpointer=ckpt) as ac:
        for _ in range(4):
            _train_step(t)
            ac.save_state().result()
        ac.wait()
        assert sorted(p.name for p in root.iterdir()) == ["checkpoint_2", "checkpoint_3"]
        assert ac.latest_checkpoint() == f"{root}/checkpoint_3"
        params = _params(t)
        t.acc.project_configuration.iteration = 3  # a save onto a committed checkpoint
        with pytest.raises(async_ckpt.CheckpointError, match="already exists"):
            ac.save_state()
        _train_step(t)
        ac.load_state()  # the newest committed one
        assert _equal(_params(t), params)
        assert t.acc.save_iteration == 4  # the next save goes after the loaded one
        ac.save_state().result()
        ac.wait()
        assert sorted(p.name for p in root.iterdir()) == ["checkpoint_3", "checkpoint_4"]
        t.acc.project_configuration.iteration = 0  # going back: the save just made stays
        ac.save_state()
    names = ["checkpoint_0", "checkpoint_3", "checkpoint_4"]
    assert sorted(p.name for p in root.iterdir()) == names  # close() waited and retained


def test_module_functions_share_one_checkpointer(tmp_path: Path, ckpt) -> None:
    t = _build()
    shared = ac_acc.checkpointer_for(t.acc, checkpointer=ckpt)
    fut = ac_acc.save_state(t.acc, tmp_path / "c")
    assert ac_acc.checkpointer_for(t.acc) is shared and shared.checkpointer is ckpt
    with pytest.raises(async_ckpt.CheckpointError, match="exists already"):
        ac_acc.checkpointer_for(t.acc, executor="thread")
    params = _params(t)
    _train_step(t)
    ac_acc.load_state(t.acc, tmp_path / "c")  # waits for the save first
    assert fut.done() and fut.exception() is None
    assert _equal(_params(t), params)
    shared.close()
    fresh = ac_acc.checkpointer_for(t.acc, executor="thread")
    assert fresh is not shared and fresh.checkpointer is not ckpt
    fresh.close()


def test_failed_save_raises_once_at_the_next_save(tmp_path: Path, ckpt) -> None:
    t = _build()

    def sabotage(models, weights, output_dir):  # the worker will find a file there
        if output_dir.endswith("bad"):
            os.rmdir(output_dir)
            Path(output_dir).write_text("not a directory")

    t.acc.register_save_state_pre_hook(sabotage)
    with AcceleratorCheckpointer(t.acc, checkpointer=ckpt) as ac:
        failed = ac.save_state(tmp_path / "bad")  # returns once staged: the write fails later
        with pytest.raises(FileExistsError) as raised:
            ac.save_state(tmp_path / "ok")  # the previous save's error, raised here once
        assert failed.done() and raised.value is failed.exception()
        ac.save_state(tmp_path / "ok").result()
    assert (tmp_path / "ok" / "metadata.json").is_file()


def test_start_allocates_the_staging_memory_of_the_first_save(tmp_path: Path) -> None:
    t = _build()
    _train_step(t)  # the optimizer has its moments: the state has its final shape
    with AcceleratorCheckpointer(t.acc, executor="thread") as ac:
        stager = ac.checkpointer.stager
        assert stager.generation == 0
        ac.start()
        assert stager.generation == 1
        ac.save_state(tmp_path / "c").result()
        assert stager.generation == 1  # the first save found its buffers ready


def test_unsupported_distributed_types_are_refused() -> None:
    for kind in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.XLA):
        with pytest.raises(NotImplementedError, match=kind.value):
            AcceleratorCheckpointer(SimpleNamespace(distributed_type=kind))


# ------------------------------------------------------------------ two processes


def _ddp_env(rank: int, world_size: int, local: bool) -> None:
    """What accelerate reads to join the group run_ranks initialised (gloo, CPU)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank if local else 0),
        LOCAL_WORLD_SIZE=str(world_size if local else 1),
        MASTER_PORT="29500",  # not used: the group exists already
        OMP_NUM_THREADS="1",
    )


def _ddp_rank(rank: int, world_size: int, root: str, single: str) -> dict[str, Any]:
    _ddp_env(rank, world_size, local=True)
    t = _build()
    assert t.acc.distributed_type == DistributedType.MULTI_CPU
    assert t.acc.num_processes == world_size and t.acc.process_index == rank
    assert isinstance(t.model, torch.nn.parallel.DistributedDataParallel)
    _seed_all(100 + rank)  # every process draws its own numbers
    for _ in range(2):
        _train_step(t)
    out: dict[str, Any] = {}
    with AcceleratorCheckpointer(t.acc, executor="thread") as ac:  # no worker start: fast
        ac.save_state(f"{root}/ddp").result()
        params, expected = _params(t), _draws()
        for _ in range(2):
            _train_step(t)
        ac.load_state(f"{root}/ddp")
        out["params_restored"] = _equal(_params(t), params)
        out["draws"] = _draws()
        out["expected"] = expected
        # A checkpoint of one process loads into two: rank 1 finds no generators of its own.
        before = torch.get_rng_state()
        ac.load_state(single)
        out["single_params"] = [p.tolist() for p in _params(t)]  # tensors would need this
        # process alive until the parent unpickled them
        out["rng_kept"] = torch.equal(torch.get_rng_state(), before)
    return out


@pytest.mark.multiprocess
def test_two_processes_ddp(tmp_path: Path, ckpt) -> None:
    single = _build(seed=3)
    with AcceleratorCheckpointer(single.acc, checkpointer=ckpt) as ac:
        ac.save_state(tmp_path / "single").result()
    single_params = _params(single)
    out = run_ranks(_ddp_rank, 2, str(tmp_path), str(tmp_path / "single"))
    for rank in range(2):
        assert out[rank]["params_restored"]
        assert out[rank]["draws"] == out[rank]["expected"]
        assert out[rank]["single_params"] == [p.tolist() for p in single_params]
    assert out[0]["expected"] != out[1]["expected"]  # the generators were per process
    assert out[0]["rng_kept"] is False and out[1]["rng_kept"] is True
    keys = _keys(tmp_path / "ddp")
    assert {"rng.rank0.torch", "rng.rank1.torch", "models.0.0.weight"} <= keys
    assert not any(".module." in k or k.startswith("models.0.module") for k in keys)
    meta = json.loads((tmp_path / "ddp" / "metadata.json").read_text())
    assert meta["world_size"] == 2


def _node_rank(rank: int, world_size: int, root: str) -> list[str]:
    _ddp_env(rank, world_size, local=False)  # each process its own "node"
    t = _build(project_config=ProjectConfiguration(save_on_each_node=True))
    assert t.acc.num_processes == 2 and t.acc.local_process_index == 0
    _seed_all(10 + rank)
    _train_step(t)
    with AcceleratorCheckpointer(t.acc, executor="thread") as ac:  # no worker start: fast
        assert not ac.checkpointer.distributed  # a node of one process saves alone
        ac.save_state(f"{root}/node{rank}").result()  # each node's own disk
        params, expected = _params(t), _draws()
        _train_step(t)
        ac.load_state(f"{root}/node{rank}")
        assert _equal(_params(t), params)
        assert _draws() == expected
    return sorted(json.loads(Path(f"{root}/node{rank}/metadata.json").read_text())["entries"])


@pytest.mark.multiprocess
def test_save_on_each_node_saves_a_checkpoint_per_node(tmp_path: Path) -> None:
    keys = run_ranks(_node_rank, 2, str(tmp_path))
    for rank in range(2):
        rng = {k.split(".")[1] for k in keys[rank] if k.startswith("rng.")}
        assert rng == {f"rank{rank}"}
        assert "models.0.0.weight" in keys[rank]


def test_missing_generators_are_logged(tmp_path: Path, ckpt, caplog) -> None:
    t = _build()
    with AcceleratorCheckpointer(t.acc, checkpointer=ckpt) as ac:
        ac.save_state(tmp_path / "c").result()
        t.acc.state.process_index = 5  # as if a process the checkpoint has no states for
        try:
            before = torch.get_rng_state()
            with caplog.at_level(logging.WARNING, logger="async_ckpt"):
                ac.load_state(tmp_path / "c")
        finally:
            t.acc.state.process_index = 0
    assert "no generator states for process 5" in caplog.text
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.multiprocess
def test_benchmark_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import accelerate_bench

    argv = ["--width", "32", "--layers", "1", "--repeats", "2"]
    assert accelerate_bench.main([*argv, "--dir", str(tmp_path), "--out", str(tmp_path)]) == 0
    assert "| accelerate `save_state` |" in capsys.readouterr().out
    (result,) = tmp_path.glob("accelerate-*.json")
    runs = json.loads(result.read_text())["runs"]
    assert len(runs["accelerate"]) == len(runs["async_ckpt"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("accel-bench-")]  # cleaned
