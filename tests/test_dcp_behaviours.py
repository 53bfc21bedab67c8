"""Behaviours torch.distributed.checkpoint (DCP) users rely on, run against async_ckpt.

Each test is written the way a DCP user writes the code, with the import
changed: ``import async_ckpt as dcp`` where DCP's own tests (and its tutorial)
have ``import torch.distributed.checkpoint as dcp``. The behaviours follow
PyTorch's test/distributed/checkpoint/ (file-system round trips, DTensor
resharding across meshes, tensor parallel and meta-device loading, training
resumes with ``get_state_dict``/``set_state_dict``, overwrite, ``no_dist``,
partial loads and collective loads); the code is our own. CPU and gloo only.

Every comparison is bit-exact; every multi-rank body runs on gloo ranks
forked by ``dist_utils.run_ranks``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_ranks
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import async_ckpt as dcp

pytestmark = pytest.mark.multiprocess


# --------------------------------------------------------------------------- helpers


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_same(a: Any, b: Any, path: str = "state") -> None:
    """``a`` and ``b`` hold the same structure, values and tensor bits (DTensor: local shard,
    placements and global shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b).__name__} is not a tensor"
        assert isinstance(a, DTensor) == isinstance(b, DTensor), f"{path}: DTensor vs tensor"
        if isinstance(a, DTensor):
            assert a.placements == b.placements, f"{path}: {a.placements} != {b.placements}"
            assert a.shape == b.shape, f"{path}: global shape {a.shape} != {b.shape}"
            a, b = a.to_local(), b.to_local()
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert not b.is_meta, f"{path}: still on the meta device"
        assert torch.equal(_bits(a), _bits(b)), f"{path}: bits differ"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping), f"{path}: {type(b).__name__} is not a mapping"
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for n, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}.{n}")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def _clone(tree: Any) -> Any:
    """A deep copy whose tensors own their memory (a snapshot of a live state dict)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, Mapping):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_clone(v) for v in tree)
    return tree


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    if isinstance(a, DTensor):
        a, b = a.to_local(), b.to_local()
    return a.numel() > 0 and not torch.equal(_bits(a), _bits(b))


# ------------------------------------------------------------ single-process round trips


def _rich_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    wide = torch.randn(6, 9, generator=g)
    return {
        "model": {
            "layer": {"weight": base.clone(), "bias": torch.randn(7, generator=g)},
            "deep": {"er": {"still": torch.randn(2, 3, 4, generator=g)}},
        },
        "dtypes": {
            "f64": base.double(),
            "f32": base,
            "f16": base.half(),
            "bf16": (base * 3.1).bfloat16(),
            "i8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
            "u8": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g),
            "i16": torch.randint(-(2**15), 2**15 - 1, (4, 2), dtype=torch.int16, generator=g),
            "i32": torch.randint(-(2**31), 2**31 - 1, (3,), dtype=torch.int32, generator=g),
            "i64": torch.arange(-5, 6, dtype=torch.int64) * (2**40),
            "bool": torch.rand(11, generator=g) > 0.5,
            "c64": torch.complex(base, -base),
        },
        "shapes": {
            "scalar": torch.tensor(3.25),
            "empty": torch.empty(0, 3),
            "transposed": wide.t(),  # not contiguous
            "columns": wide[:, 2:5],  # a view into a larger storage
            "big": torch.arange(400_000, dtype=torch.float32),  # several MB: many writes
        },
        "list": [torch.ones(2), {"inner": torch.full((3,), 4.0)}, 7],
        "step": 12,
        "lr": 1e-3,
        "name": "run-7",
        "flag": True,
        "nothing": None,
        "ids": [1, 2, 3],
        "pair": (4, "five"),
        "config": {"depth": 3, "act": "gelu"},
    }


def _target_like(state: dict[str, Any], holder: torch.Tensor) -> dict[str, Any]:
    """A load target: zeroed tensors (same layout), other python values in every leaf."""

    def blank(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v)
        if isinstance(v, dict):
            return {k: blank(x) for k, x in v.items()}
        if isinstance(v, list):
            return [blank(x) for x in v]
        if isinstance(v, tuple):
            return (0, "")
        return {int: 0, float: 0.0, str: "", bool: False}.get(type(v), "placeholder")

    target = blank(state)
    target["shapes"]["columns"] = holder[:, 2:5]  # loads in place into a view
    return target


@pytest.mark.parametrize(
    ("how", "thread_count"),
    [("save", 1), ("save", 2), ("save", 4), ("async_save", 1), ("async_save", 3)],
)
def test_filesystem_round_trip(tmp_path, how, thread_count):
    state = _rich_state()
    path = tmp_path / "ckpt"
    writer = dcp.FileSystemWriter(path, thread_count=thread_count)
    if how == "save":
        dcp.save(state, storage_writer=writer)
    else:
        dcp.async_save(state, storage_writer=writer).result()

    holder = torch.full((6, 9), -1.0)
    target = _target_like(state, holder)
    weight, columns = target["model"]["layer"]["weight"], target["shapes"]["columns"]
    dcp.load(target, storage_reader=dcp.FileSystemReader(path))
    _assert_same(state, target)
    # DCP loads tensors in place: the caller's tensor objects are filled, not replaced
    assert target["model"]["layer"]["weight"] is weight
    assert target["shapes"]["columns"] is columns
    assert not target["shapes"]["transposed"].is_contiguous()
    outside = torch.cat([holder[:, :2], holder[:, 5:]], dim=1)
    assert torch.equal(outside, torch.full((6, 6), -1.0)), "only the view's columns were written"

    # and by checkpoint_id, as a str
    target = _target_like(state, torch.zeros(6, 9))
    dcp.load(target, checkpoint_id=str(path))
    _assert_same(state, target)


def test_overwrite_and_overwrite_false(tmp_path):
    path = tmp_path / "ckpt"
    first = {"w": torch.arange(10.0), "old": torch.ones(3)}
    dcp.save(first, storage_writer=dcp.FileSystemWriter(path, overwrite=False))  # fresh: fine

    second = {"w": torch.arange(10.0) * 2}
    dcp.save(second, checkpoint_id=path)  # DCP's default writer overwrites
    target = {"w": torch.zeros(10)}
    dcp.load(target, checkpoint_id=path)
    _assert_same(second, target)
    # the overwrite replaced the whole checkpoint: the first save's extra key is gone
    with pytest.raises(Exception, match="old"):
        dcp.load({"w": torch.zeros(10), "old": torch.zeros(3)}, checkpoint_id=path)

    third = {"w": torch.arange(10.0) * 3}
    dcp.async_save(third, checkpoint_id=path).result()
    dcp.load(target, checkpoint_id=path)
    _assert_same(third, target)

    with pytest.raises(Exception, match="(?i)already exists"):
        dcp.save({"w": torch.ones(10)}, storage_writer=dcp.FileSystemWriter(path, overwrite=False))
    with pytest.raises(Exception, match="(?i)already exists"):
        dcp.async_save(
            {"w": torch.ones(10)}, storage_writer=dcp.FileSystemWriter(path, overwrite=False)
        ).result()
    dcp.load(target, checkpoint_id=path)
    _assert_same(third, target)  # the refused saves left it alone


class _Net(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_load_model_only_from_model_and_optimizer_checkpoint(tmp_path):
    model = _Net(seed=0)
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.ones(2, 8)).sum().backward()
    optim.step()
    path = tmp_path / "ckpt"
    dcp.save(
        {"model": model.state_dict(), "optim": optim.state_dict(), "step": 1}, checkpoint_id=path
    )

    fresh = _Net(seed=1)
    assert _differs(fresh.fc1.weight, model.fc1.weight)
    target = {"model": fresh.state_dict()}
    dcp.load(target, checkpoint_id=path)  # the target's keys decide; "optim", "step" stay behind
    fresh.load_state_dict(target["model"])
    _assert_same(model.state_dict(), fresh.state_dict())

    # a key the target asks for and the checkpoint lacks is an error naming it
    extra = {"model": _Net(seed=2).state_dict(), "scheduler_step": torch.zeros(())}
    with pytest.raises(Exception, match="scheduler_step"):
        dcp.load(extra, checkpoint_id=path)
    nested = {"model": {**_Net(seed=2).state_dict(), "head.weight": torch.zeros(4, 16)}}
    with pytest.raises(Exception, match=r"model\.head\.weight"):
        dcp.load(nested, checkpoint_id=path)


# ----------------------------------------------------------------- DTensor resharding

_G = torch.Generator().manual_seed(7)
EVEN = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
UNEVEN = torch.randn(10, 7, generator=_G)  # 10 rows over 4 ranks: 3, 3, 3, 1; 7 cols over 2: 4, 3
TINY = torch.randn(3, 5, generator=_G).to(torch.bfloat16)  # over 4 ranks one rank holds 0 rows
SPARSE = torch.randn(2, 3, generator=_G).double()  # over 4 ranks two ranks hold 0 rows
TENSORS = {"even": EVEN, "uneven": UNEVEN, "tiny": TINY, "sparse": SPARSE}


def _mesh_1d() -> DeviceMesh:
    return init_device_mesh("cpu", (4,))


def _mesh_2d() -> DeviceMesh:
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


def _sharded(mesh: DeviceMesh, placements: list, zeros: bool) -> dict[str, DTensor]:
    return {
        k: distribute_tensor(torch.zeros_like(v) if zeros else v.clone(), mesh, placements)
        for k, v in TENSORS.items()
    }


def _reshard_body(rank, world_size, root, save_layout, load_layouts):
    meshes = {"1d": _mesh_1d(), "2d": _mesh_2d()}
    placements = {
        "S0": [Shard(0)],
        "S1": [Shard(1)],
        "R": [Replicate()],
        "S0S1": [Shard(0), Shard(1)],
        "RS0": [Replicate(), Shard(0)],
        "S1R": [Shard(1), Replicate()],
    }
    mesh_name, place = save_layout
    saved = _sharded(meshes[mesh_name], placements[place], zeros=False)
    if mesh_name == "1d":
        assert saved["tiny"].to_local().numel() > 0 or rank == 3
        assert (saved["sparse"].to_local().numel() == 0) == (rank >= 2), "empty shards exist"
    dcp.save({"model": saved}, checkpoint_id=root)

    for mesh_name, place in load_layouts:
        mesh, pl = meshes[mesh_name], placements[place]
        target = {"model": _sharded(mesh, pl, zeros=True)}
        dcp.load(target, checkpoint_id=root)
        expected = _sharded(mesh, pl, zeros=False)
        _assert_same(expected, target["model"], f"{mesh_name}:{place}")
        for k, v in TENSORS.items():
            full = target["model"][k].full_tensor()
            assert torch.equal(_bits(full), _bits(v)), f"{mesh_name}:{place}: {k}"
    return True


@pytest.mark.parametrize(
    ("save_layout", "load_layouts"),
    [
        (("1d", "S0"), [("2d", "S0S1"), ("2d", "RS0"), ("2d", "S1R")]),
        (("2d", "S0S1"), [("1d", "S0"), ("1d", "S1"), ("1d", "R")]),
        (("2d", "RS0"), [("1d", "S1"), ("2d", "S0S1")]),
    ],
    ids=["1d-to-2d", "2d-to-1d", "2d-replicated-to-both"],
)
def test_dtensor_reshard_between_1d_and_2d_meshes(tmp_path, save_layout, load_layouts):
    root = str(tmp_path / "ckpt")
    assert run_ranks(_reshard_body, 4, root, save_layout, load_layouts, timeout=120) == [True] * 4
    # one process, no process group: plain tensors receive the whole of each
    target = {"model": {k: torch.zeros_like(v) for k, v in TENSORS.items()}}
    dcp.load(target, checkpoint_id=root, no_dist=True)
    _assert_same(TENSORS, target["model"])


SUB_TP = torch.randn(6, 4, generator=_G)
SUB_EXPLICIT = torch.randn(5, 3, generator=_G)


def _submesh_state(mesh_2d: DeviceMesh, explicit: DeviceMesh, zeros: bool) -> dict[str, Any]:
    def z(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t) if zeros else t.clone()

    return {
        # tensor parallel over mesh_2d["tp"], replicated across the two "dp" groups (TP + DDP)
        "tp_sharded": distribute_tensor(z(SUB_TP), mesh_2d["tp"], [Shard(0)]),
        # a mesh that leaves ranks 0 and 2 out: they hold no piece
        "explicit": distribute_tensor(z(SUB_EXPLICIT), explicit, [Shard(1)]),
        "world": distribute_tensor(z(UNEVEN), mesh_2d, [Shard(0), Shard(1)]),
    }


def _submesh_body(rank, world_size, root):
    mesh_2d = _mesh_2d()
    explicit = DeviceMesh("cpu", [1, 3])  # created on every rank
    state = _submesh_state(mesh_2d, explicit, zeros=False)
    assert (state["explicit"].to_local().numel() == 0) == (rank in (0, 2))
    dcp.save(state, checkpoint_id=root)
    target = _submesh_state(mesh_2d, explicit, zeros=True)
    dcp.load(target, checkpoint_id=root)
    _assert_same(state, target)

    # the sub-mesh tensors resharded onto the whole world
    mesh_1d = _mesh_1d()
    target = {
        "tp_sharded": distribute_tensor(torch.zeros_like(SUB_TP), mesh_1d, [Shard(1)]),
        "explicit": distribute_tensor(torch.zeros_like(SUB_EXPLICIT), mesh_1d, [Shard(0)]),
        "world": distribute_tensor(torch.zeros_like(UNEVEN), mesh_1d, [Replicate()]),
    }
    dcp.load(target, checkpoint_id=root)
    assert torch.equal(target["tp_sharded"].full_tensor(), SUB_TP)
    assert torch.equal(target["explicit"].full_tensor(), SUB_EXPLICIT)
    assert torch.equal(target["world"].to_local(), UNEVEN)
    return True


def test_dtensor_on_sub_meshes(tmp_path):
    root = str(tmp_path / "ckpt")
    assert run_ranks(_submesh_body, 4, root, timeout=120) == [True] * 4
    target = {
        "tp_sharded": torch.zeros(6, 4),
        "explicit": torch.zeros(5, 3),
        "world": torch.zeros(10, 7),
    }
    dcp.load(target, checkpoint_id=root, no_dist=True)
    _assert_same({"tp_sharded": SUB_TP, "explicit": SUB_EXPLICIT, "world": UNEVEN}, target)


# -------------------------------------------------------------------- tensor parallel


class _TPModel(torch.nn.Module):
    """net3 has one output row: under tensor parallelism one rank holds an empty shard."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net1 = torch.nn.Linear(5, 10, device=device)
        self.net2 = torch.nn.Linear(10, 15, device=device)
        self.net3 = torch.nn.Linear(15, 1, device=device)
        self.head = torch.nn.Linear(1, 2, device=device)  # not parallelised: plain tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net3(torch.relu(self.net2(torch.relu(self.net1(x))))))


def _parallelize(model: torch.nn.Module, mesh: DeviceMesh) -> torch.nn.Module:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {
        "net1": ColwiseParallel(),
        "net2": RowwiseParallel(),
        "net3": ColwiseParallel(output_layouts=Replicate()),
    }
    return parallelize_module(model, mesh, plan)


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5).add_(0.25)


def _tp_inplace_body(rank, world_size, root):
    mesh = init_device_mesh("cpu", (world_size,))
    model = _parallelize(_TPModel(), mesh)
    assert isinstance(model.net1.weight, DTensor) and not isinstance(model.head.weight, DTensor)
    assert (model.net3.weight.to_local().numel() == 0) == (rank == 1), "an empty shard"
    saved = _clone(model.state_dict())
    x = torch.rand(3, 5, generator=torch.Generator().manual_seed(1))
    expected_out = model(x).detach()
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(root))

    _perturb(model)  # now the parameters differ from the checkpoint
    live = model.state_dict()
    assert all(_differs(saved[k], live[k]) for k in ("net1.weight", "net2.weight", "head.weight"))
    dcp.load(live, storage_reader=dcp.FileSystemReader(root))
    _assert_same(saved, model.state_dict())
    assert torch.equal(model(x).detach(), expected_out)
    return True


def test_tensor_parallel_save_then_load_in_place(tmp_path):
    assert run_ranks(_tp_inplace_body, 2, str(tmp_path / "ckpt"), timeout=120) == [True, True]


def _tp_meta_body(rank, world_size, root, how):
    mesh = init_device_mesh("cpu", (world_size,))
    model = _parallelize(_TPModel(), mesh)
    original = {"model": model.state_dict()}
    dcp.save(original, storage_writer=dcp.FileSystemWriter(root))
    x = torch.rand(3, 5, generator=torch.Generator().manual_seed(1))
    expected_out = model(x).detach()

    meta_model = _parallelize(_TPModel(device="meta"), mesh)
    assert meta_model.net1.weight.is_meta and meta_model.head.weight.is_meta
    if how == "assign":
        # DCP's test_tp_checkpoint_load_on_meta_device: load into the meta state dict, which
        # DCP fills with materialised tensors in place, then assign them to the model
        model_sd = meta_model.state_dict()
        to_load = {"model": model_sd}
        dcp.load(to_load, storage_reader=dcp.FileSystemReader(root))
        assert to_load["model"] is model_sd, "the inner dict is filled in place"
        for k, v in model_sd.items():
            assert not v.is_meta, f"{k} is still on the meta device after the load"
        meta_model.load_state_dict(model_sd, assign=True)
    else:
        # materialise first (torchtitan's way), then load in place
        meta_model.to_empty(device="cpu")
        dcp.load({"model": meta_model.state_dict()}, checkpoint_id=root)
    _assert_same(original["model"], meta_model.state_dict())
    assert torch.equal(meta_model(x).detach(), expected_out)
    return True


@pytest.mark.parametrize("how", ["assign", "to_empty"])
def test_tensor_parallel_load_into_meta_device_model(tmp_path, how):
    root = str(tmp_path / "ckpt")
    assert run_ranks(_tp_meta_body, 2, root, how, timeout=120) == [True, True]


# --------------------------------------------------------- training resumes (DDP, FSDP2)


class AppState(Stateful):
    """DCP's tutorial wrapper: model and optimizer state through get/set_state_dict."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state_dict, optimizer_state_dict = get_state_dict(self.model, self.optimizer)
        return {"model": model_state_dict, "optim": optimizer_state_dict}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )


STEPS, SAVE_AT = 6, 3


def _train(model, optim, sched, steps, rank):
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
        F.mse_loss(model(x), y).backward()
        optim.step()
        optim.zero_grad()
        sched.step()


def _wrap(kind: str, seed: int, world_size: int) -> torch.nn.Module:
    model = _Net(seed=seed)
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (model.fc1, model.fc2, model.out):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _make(kind: str, seed: int, world_size: int):
    model = _wrap(kind, seed, world_size)
    optim = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    return model, optim, sched


def _resume_body(rank, world_size, root, kind, saver):
    # the uninterrupted run, which checkpoints at SAVE_AT and trains on
    model, optim, sched = _make(kind, 0, world_size)
    _train(model, optim, sched, range(SAVE_AT), rank)
    at_save = _clone(AppState(model, optim).state_dict())
    state = {"app": AppState(model, optim), "sched": sched, "step": SAVE_AT}
    try:
        if saver == "save":
            dcp.save(state, checkpoint_id=root)
            _train(model, optim, sched, range(SAVE_AT, STEPS), rank)
        else:  # training goes on while the checkpoint is written
            future = dcp.async_save(state, checkpoint_id=root)
            _train(model, optim, sched, range(SAVE_AT, STEPS), rank)
            future.result()
    finally:
        dcp.close_async_saves()  # a rank process exits without atexit handlers
    final = _clone(AppState(model, optim).state_dict())
    final_lr = optim.param_groups[0]["lr"]

    # a restarted job: other initial weights, empty optimizer state, fresh scheduler
    model, optim, sched = _make(kind, 1, world_size)
    app = AppState(model, optim)
    assert _differs(at_save["model"]["fc1.weight"], get_model_state_dict(model)["fc1.weight"])
    state = {"app": app, "sched": sched, "step": 0}
    dcp.load(state, checkpoint_id=root)
    assert state["step"] == SAVE_AT
    assert sched.last_epoch == SAVE_AT
    _assert_same(at_save, app.state_dict(), "restored")
    _train(model, optim, sched, range(SAVE_AT, STEPS), rank)
    _assert_same(final, app.state_dict(), "resumed")
    assert optim.param_groups[0]["lr"] == final_lr
    return True


@pytest.mark.parametrize(
    ("kind", "saver"), [("ddp", "save"), ("fsdp2", "async_save")], ids=["ddp", "fsdp2"]
)
def test_training_resume_is_bit_identical(tmp_path, kind, saver):
    # FSDP2 (fully_shard) runs on CPU with gloo in torch 2.13: no skip needed
    root = str(tmp_path / "ckpt")
    assert run_ranks(_resume_body, 2, root, kind, saver, timeout=120) == [True, True]


def _model_only_body(rank, world_size, root):
    model, optim, sched = _make("fsdp2", 0, world_size)
    _train(model, optim, sched, range(2), rank)
    dcp.save({"app": AppState(model, optim)}, checkpoint_id=root)

    fresh = _wrap("fsdp2", 1, world_size)  # evaluation or fine-tuning: weights only
    model_sd = get_model_state_dict(fresh)
    assert _differs(model_sd["fc1.weight"], get_model_state_dict(model)["fc1.weight"])
    dcp.load({"app": {"model": model_sd}}, checkpoint_id=root)
    set_model_state_dict(fresh, model_sd)
    _assert_same(get_model_state_dict(model), get_model_state_dict(fresh))

    missing = {"app": {"model": get_model_state_dict(fresh), "ema": {"decay": torch.zeros(())}}}
    with pytest.raises(Exception, match=r"app\.ema\.decay"):
        dcp.load(missing, checkpoint_id=root)
    return True


def test_fsdp2_load_model_only_from_model_and_optimizer_checkpoint(tmp_path):
    root = str(tmp_path / "ckpt")
    assert run_ranks(_model_only_body, 2, root, timeout=120) == [True, True]


# ------------------------------------------------------- process groups and collectives


def _no_dist_body(rank, world_size, root):
    mine = {"w": torch.full((4,), float(rank + 1)), "meta": {"rank": rank}}
    if rank == 1:
        # alone, while rank 0 is in a barrier: any collective here would hang or mismatch
        dcp.save(mine, checkpoint_id=f"{root}/solo", no_dist=True)
        try:
            dcp.async_save(mine, checkpoint_id=f"{root}/solo-async", no_dist=True).result()
        finally:
            dcp.close_async_saves()
        target = {"w": torch.zeros(4), "meta": {"rank": -1}}
        dcp.load(target, checkpoint_id=f"{root}/solo", no_dist=True)
        _assert_same(mine, target)
    dist.barrier()
    # the group still works for a collective save and load afterwards
    both = {"shared": torch.arange(6.0)}
    dcp.save(both, checkpoint_id=f"{root}/both")
    target = {"shared": torch.zeros(6)}
    dcp.load(target, checkpoint_id=f"{root}/both")
    _assert_same(both, target)
    return True


def test_no_dist_on_one_rank_of_a_group(tmp_path):
    assert run_ranks(_no_dist_body, 2, str(tmp_path), timeout=60) == [True, True]
    for name in ("solo", "solo-async"):
        target = {"w": torch.zeros(4), "meta": {"rank": -1}}
        dcp.load(target, checkpoint_id=tmp_path / name)
        _assert_same({"w": torch.full((4,), 2.0), "meta": {"rank": 1}}, target)


def _process_group_body(rank, world_size, root):
    mesh = _mesh_2d()  # rows [0, 1] and [2, 3]: each row is one group of its own
    pair = mesh["tp"]
    group, g = pair.get_group(), rank // 2
    state = {
        "sharded": distribute_tensor(UNEVEN * (g + 1), pair, [Shard(0)]),
        "plain": torch.full((3,), float(g)),
    }
    dcp.save(state, checkpoint_id=f"{root}/g{g}", process_group=group)
    target = {
        "sharded": distribute_tensor(torch.zeros_like(UNEVEN), pair, [Shard(1)]),
        "plain": torch.zeros(3),
    }
    dcp.load(target, checkpoint_id=f"{root}/g{g}", process_group=group)
    assert torch.equal(target["sharded"].full_tensor(), UNEVEN * (g + 1))
    assert torch.equal(target["plain"], torch.full((3,), float(g)))
    return True


def test_process_group_keyword_saves_and_loads_within_a_subgroup(tmp_path):
    assert run_ranks(_process_group_body, 4, str(tmp_path), timeout=120) == [True] * 4
    for g in (0, 1):
        target = {"sharded": torch.zeros(10, 7), "plain": torch.zeros(3)}
        dcp.load(target, checkpoint_id=tmp_path / f"g{g}", no_dist=True)
        assert torch.equal(target["sharded"], UNEVEN * (g + 1))
