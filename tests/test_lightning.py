"""AsyncCkptIO: Lightning's CheckpointIO backed by async_ckpt (docs/lightning.md).

One small module trains on the CPU; a module-scoped run with ModelCheckpoint
(top-k by a logged metric, save_last, every_n_train_steps) feeds the on-disk,
resume and load_from_checkpoint tests.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import os
import shutil
import signal
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from faulty_storage import FailingWriter, StopAtWriter, wait_reached

pl = pytest.importorskip("pytorch_lightning")
from lightning_fabric.plugins.environments import ClusterEnvironment  # noqa: E402
from pytorch_lightning.callbacks import Callback, ModelCheckpoint  # noqa: E402
from pytorch_lightning.strategies import DDPStrategy  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import async_ckpt  # noqa: E402
from async_ckpt.format import allow_list  # noqa: E402
from async_ckpt.integrations.lightning import RECORD_KEY, AsyncCkptIO, load_checkpoint  # noqa: E402
from async_ckpt.storage.detect import detect_root  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
    pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory .* exists and is not empty"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint"),
]


# ---------------------------------------------------------------------------- model and helpers
class TinyModel(pl.LightningModule):
    """Linear + BatchNorm (its state_dict carries module versions) + Adam + StepLR."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optim = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [optim], [torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.5)]

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
        return DataLoader(data, batch_size=8)  # 8 steps per epoch, always in the same order


def make_trainer(**kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


class RecordingIO(AsyncCkptIO):
    """AsyncCkptIO that remembers what it was asked to save (deep copies) and remove."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saved: list[str] = []
        self.removed: list[str] = []
        self.copies: dict[str, dict] = {}
        self.had_checkpointer = False

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.saved.append(os.fspath(path))
        self.copies[os.fspath(path)] = copy.deepcopy(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)
        self.had_checkpointer |= self.checkpointer is not None

    def remove_checkpoint(self, path):
        self.removed.append(os.fspath(path))
        super().remove_checkpoint(path)


class Capture(Callback):
    """What training starts from after a restore: step, model, optimizer, scheduler."""

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.step = trainer.global_step
        self.model = copy.deepcopy(module.state_dict())
        self.optim = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.sched = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())


def assert_same_tree(got: Any, want: Any, where: str = "") -> None:
    """Equal nested containers of the same types, tensors bit for bit (dtype included)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        raw = [t.reshape(-1).view(torch.uint8) for t in (got, want)]
        assert torch.equal(*raw), f"{where}: values differ"
    elif isinstance(want, dict):
        assert set(got) == set(want), f"{where}: {set(got) ^ set(want)}"
        for key in want:
            assert_same_tree(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for n, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same_tree(a, b, f"{where}.{n}")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def step_of(path: str) -> int:
    return int(Path(path).stem.split("step=")[1])


def trainer_checkpoint(**extra: Any) -> dict[str, Any]:
    """A dict shaped like a Trainer checkpoint (so the plugin saves it asynchronously)."""
    return {"pytorch-lightning_version": pl.__version__, "global_step": 1, **extra}


# ---------------------------------------------------------------------------- one trained run
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """8 steps, a checkpoint every 2 steps: top-2 by train_loss, plus last.ckpt."""
    root = tmp_path_factory.mktemp("lightning") / "ckpts"
    plugin = RecordingIO()  # the default: process executor
    callback = ModelCheckpoint(
        dirpath=root, monitor="train_loss", save_top_k=2, every_n_train_steps=2, save_last=True
    )
    model = TinyModel()
    trainer = make_trainer(max_steps=8, plugins=[plugin], callbacks=[callback])
    trainer.fit(model)
    final = {
        "model": copy.deepcopy(model.state_dict()),
        "optim": copy.deepcopy(trainer.optimizers[0].state_dict()),
        "sched": copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict()),
    }
    return dataclasses.make_dataclass("Run", ["root", "plugin", "callback", "final"])(
        root, plugin, callback, final
    )


@pytest.mark.multiprocess
def test_model_checkpoint_writes_async_ckpt_checkpoints_and_rotates_top_k(run):
    plugin, callback = run.plugin, run.callback
    tops = [p for p in plugin.saved if "step=" in p]
    assert [step_of(p) for p in tops] == [2, 4, 6, 8]
    assert plugin.saved.count(str(run.root / "last.ckpt")) == 4
    assert plugin.had_checkpointer and plugin.checkpointer is None, "teardown closes it"
    kept = set(callback.best_k_models)
    assert len(kept) == 2
    assert set(plugin.removed) == set(tops) - kept, "displaced top-k checkpoints are removed"
    assert sorted(os.listdir(run.root)) == sorted([Path(p).name for p in kept] + ["last.ckpt"])
    for path in [*kept, str(run.root / "last.ckpt")]:
        assert (Path(path) / "metadata.json").is_file()
        stored = async_ckpt.materialize(path)
        want = step_of(path) if "step=" in path else 8
        assert stored["global_step"] == want
        assert set(stored["state_dict"]) == set(run.final["model"])
    # the two kept are the two lowest train_loss scores of the four saved
    key = next(k for k in plugin.copies[tops[0]]["callbacks"] if k.startswith("ModelCheckpoint"))
    score = {p: float(plugin.copies[p]["callbacks"][key]["current_score"]) for p in tops}
    assert kept == set(sorted(tops, key=score.get)[:2])


@pytest.mark.multiprocess
def test_a_load_returns_exactly_the_dict_lightning_saved(run):
    last = str(run.root / "last.ckpt")
    saved = run.plugin.copies[last]
    loaded = load_checkpoint(last)
    assert RECORD_KEY not in loaded
    assert_same_tree(loaded, saved)
    # the module versions that load_state_dict migrations read come back too
    assert isinstance(loaded["state_dict"], OrderedDict)
    assert loaded["state_dict"]._metadata == saved["state_dict"]._metadata
    assert loaded["state_dict"]._metadata["net.1"]["version"] == 2  # BatchNorm's


@pytest.mark.multiprocess
def test_resume_from_last_continues_the_step_and_the_optimizer_bit_exact(run, tmp_path):
    root = tmp_path / "ckpts"
    shutil.copytree(run.root, root, symlinks=True)  # the other tests keep the run as it was
    capture = Capture()
    resumed_model = TinyModel()
    callback = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_last=True)
    trainer = make_trainer(max_steps=12, plugins=[AsyncCkptIO()], callbacks=[callback, capture])
    trainer.fit(resumed_model, ckpt_path="last")
    assert capture.step == 8
    assert_same_tree(capture.model, run.final["model"])
    assert_same_tree(capture.optim, run.final["optim"])
    assert_same_tree(capture.sched, run.final["sched"])
    assert trainer.global_step == 12
    # resuming gives the weights of an uninterrupted run
    straight = TinyModel()
    make_trainer(max_steps=12, enable_checkpointing=False).fit(straight)
    assert_same_tree(resumed_model.state_dict(), straight.state_dict())


def test_save_last_link_into_a_fresh_directory_and_resume_through_the_link(tmp_path):
    root = tmp_path / "fresh" / "ckpts"  # nothing exists yet: the link is made right after staging

    def fit(steps: int, *callbacks: Callback, ckpt_path: str | None = None) -> pl.Trainer:
        checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_last="link")
        trainer = make_trainer(
            max_steps=steps,
            plugins=[AsyncCkptIO(executor="thread")],
            callbacks=[checkpoints, *callbacks],
        )
        trainer.fit(TinyModel(), ckpt_path=ckpt_path)
        return trainer

    fit(4)
    assert os.readlink(root / "last.ckpt") == "epoch=0-step=4.ckpt"
    assert load_checkpoint(root / "last.ckpt")["global_step"] == 4
    capture = Capture()
    fit(6, capture, ckpt_path="last")
    assert capture.step == 4
    # a save to the link's path replaces the link, never what it points to
    plugin = AsyncCkptIO(executor="thread")
    target = os.path.realpath(root / "last.ckpt")
    plugin.save_checkpoint(trainer_checkpoint(global_step=99), root / "last.ckpt")
    plugin.teardown()
    assert not os.path.islink(root / "last.ckpt")
    assert load_checkpoint(root / "last.ckpt")["global_step"] == 99
    assert load_checkpoint(target)["global_step"] == 6


def test_resume_from_an_explicit_path(run):
    path = min(run.callback.best_k_models, key=step_of)
    stored = load_checkpoint(path)
    capture = Capture()
    trainer = make_trainer(
        max_steps=step_of(path) + 1,
        plugins=[AsyncCkptIO(executor="thread")],
        callbacks=[capture],
        enable_checkpointing=False,
    )
    trainer.fit(TinyModel(), ckpt_path=path)
    assert capture.step == step_of(path)
    assert_same_tree(capture.optim, stored["optimizer_states"][0])
    assert_same_tree(capture.model, stored["state_dict"])


def test_load_from_checkpoint_reads_our_directories_and_honours_map_location(run):
    path = run.callback.best_model_path
    stored = async_ckpt.materialize(path)
    model = TinyModel.load_from_checkpoint(path, map_location="cpu")
    assert model.hparams.lr == 0.05
    for key, value in model.state_dict().items():
        assert torch.equal(value, stored["state_dict"][key]), key
    # a function, as torch.load calls it: (storage, saved location) -> storage; what it
    # returns is what the model gets (here zeroed copies)
    seen = []

    def zeroed(storage, location):
        seen.append(location)
        copy = storage.clone()
        copy.fill_(0)
        return copy

    model = TinyModel.load_from_checkpoint(path, map_location=zeroed)
    assert seen and set(seen) == {"cpu"}
    assert all(not t.any() for t in model.state_dict().values())
    # the plugin's own load path (resume) too: a device, and a {saved: new} dict
    io = AsyncCkptIO()
    for where in ("meta", torch.device("meta"), {"cpu": "meta"}):
        loaded = io.load_checkpoint(path, map_location=where)
        assert loaded["state_dict"]["net.0.weight"].device.type == "meta"
        assert loaded["optimizer_states"][0]["state"][0]["exp_avg"].device.type == "meta"
    assert io.checkpointer is None, "loading starts no worker"


@pytest.mark.gpu
def test_load_from_checkpoint_onto_cuda(run):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = TinyModel.load_from_checkpoint(run.callback.best_model_path, map_location="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    loaded = load_checkpoint(run.callback.best_model_path, map_location="cuda:0")
    assert loaded["optimizer_states"][0]["state"][0]["exp_avg"].is_cuda


def test_load_from_checkpoint_still_reads_torch_save_files(tmp_path):
    model = TinyModel(lr=0.3)
    trainer = make_trainer(max_steps=1, enable_checkpointing=False)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")  # Lightning's TorchCheckpointIO
    assert (tmp_path / "plain.ckpt").is_file()
    loaded = TinyModel.load_from_checkpoint(tmp_path / "plain.ckpt")
    assert loaded.hparams.lr == 0.3
    assert torch.equal(loaded.net[0].weight, model.net[0].weight)


# ---------------------------------------------------------------------------- remove while saving
def held_writer(gate: Path) -> Any:
    """A storage_writer whose saves stop before their first data file until the gate opens."""
    return lambda path, **options: StopAtWriter(path, gate=gate, point="before-write")


def spy_on_wait(monkeypatch: pytest.MonkeyPatch, future: Any) -> threading.Event:
    """An event set when someone starts waiting on ``future`` (through ``exception()``)."""
    waiting = threading.Event()
    real_exception = future.exception

    def spy(timeout=None):
        waiting.set()
        return real_exception(timeout)

    monkeypatch.setattr(future, "exception", spy)
    return waiting


def test_remove_checkpoint_deletes_after_a_save_of_that_path_in_flight(tmp_path, gate, monkeypatch):
    path = tmp_path / "held.ckpt"
    plugin = AsyncCkptIO(executor="thread", storage_writer=held_writer(gate))
    plugin.save_checkpoint(trainer_checkpoint(w=torch.arange(64.0)), path)
    wait_reached(gate, "before-write")  # the save is held before its first data file
    future = plugin.pending
    waiting = spy_on_wait(monkeypatch, future)
    plugin.remove_checkpoint(path)  # returns at once: the deletion is queued behind the save
    assert waiting.wait(timeout=120), "the removal did not wait for the save"
    assert not future.done(), "the gate holds the save, so nothing was deleted yet"
    (gate / "release").touch()
    plugin.wait()  # the save, then the removal
    assert future.result() is not None, "the save committed before the delete"
    assert not path.exists(), "the committed checkpoint was then removed, nothing came back"
    plugin.teardown()


def test_a_save_after_a_removal_of_the_same_path_waits_for_it(tmp_path, monkeypatch):
    path = tmp_path / "again.ckpt"
    plugin = AsyncCkptIO(executor="thread")
    plugin.save_checkpoint(trainer_checkpoint(w=torch.zeros(4)), path)
    plugin.wait()
    # the removal is held inside the deletion until `go`
    entered, go, guarding = threading.Event(), threading.Event(), threading.Event()
    root = type(detect_root(tmp_path))
    real_delete = root.delete

    def held_delete(self, name):
        entered.set()
        assert go.wait(timeout=120)
        real_delete(self, name)

    monkeypatch.setattr(root, "delete", held_delete)
    real_guard = plugin._await_removal_of

    def spy_guard(wanted):
        guarding.set()
        real_guard(wanted)

    monkeypatch.setattr(plugin, "_await_removal_of", spy_guard)
    plugin.remove_checkpoint(path)
    assert entered.wait(timeout=120)
    saver = threading.Thread(
        target=plugin.save_checkpoint, args=(trainer_checkpoint(w=torch.ones(4)), path)
    )
    try:
        saver.start()
        assert guarding.wait(timeout=120), "the save did not wait for the removal"
        assert saver.is_alive(), "the save is held until the deletion is done"
    finally:
        go.set()
        saver.join(timeout=120)
    plugin.teardown()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(4)), "the new save survived"


def test_a_failed_removal_is_raised_once(tmp_path, monkeypatch):
    plugin = AsyncCkptIO(executor="thread")
    plugin.save_checkpoint(trainer_checkpoint(w=torch.ones(4)), tmp_path / "a.ckpt")

    def refuse(self, name):
        raise PermissionError(f"cannot delete {name}")

    monkeypatch.setattr(type(detect_root(tmp_path)), "delete", refuse)
    plugin.remove_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(PermissionError, match="cannot delete a.ckpt"):
        plugin.wait()  # as the next save or teardown would
    plugin.teardown()  # raised once, not again
    assert (tmp_path / "a.ckpt" / "metadata.json").is_file()


def test_a_load_in_this_process_waits_for_a_save_of_that_path(tmp_path, gate, monkeypatch):
    """FSDP/ModelParallel strategies skip CheckpointIO.teardown: a fit can end mid-save."""
    path = tmp_path / "p.ckpt"
    plugin = AsyncCkptIO(executor="thread")
    plugin.save_checkpoint(trainer_checkpoint(w=torch.zeros(8)), path)
    plugin.wait()  # an older checkpoint is there
    plugin.storage_writer = held_writer(gate)
    plugin.save_checkpoint(trainer_checkpoint(w=torch.ones(8)), path)
    wait_reached(gate, "before-write")
    waiting = spy_on_wait(monkeypatch, plugin.pending)
    got: dict[str, Any] = {}
    loader = threading.Thread(target=lambda: got.update(ckpt=load_checkpoint(path)))
    loader.start()
    assert waiting.wait(timeout=120), "the load did not wait for the save"
    assert loader.is_alive() and not plugin.pending.done()
    (gate / "release").touch()
    loader.join(timeout=120)
    assert torch.equal(got["ckpt"]["w"], torch.ones(8)), "it read the new checkpoint"
    plugin.teardown()


def test_remove_checkpoint_of_a_link_removes_only_the_link(tmp_path):
    plugin = AsyncCkptIO(executor="thread")
    plugin.save_checkpoint(trainer_checkpoint(w=torch.ones(4)), tmp_path / "a.ckpt")
    plugin.wait()
    os.symlink("a.ckpt", tmp_path / "last.ckpt")
    plugin.remove_checkpoint(tmp_path / "last.ckpt")
    plugin.wait()
    assert not os.path.lexists(tmp_path / "last.ckpt")
    assert load_checkpoint(tmp_path / "a.ckpt")["w"].sum() == 4
    plugin.remove_checkpoint(tmp_path / "a.ckpt")
    plugin.remove_checkpoint(tmp_path / "never-saved.ckpt")  # nothing there: no error
    plugin.teardown()
    assert not (tmp_path / "a.ckpt").exists()


# ---------------------------------------------------------------------------- errors
def test_an_error_of_a_background_save_surfaces_at_the_next_save_and_at_teardown(tmp_path):
    plugin = AsyncCkptIO(executor="thread", storage_writer=lambda p, **options: FailingWriter(p))
    plugin.save_checkpoint(trainer_checkpoint(w=torch.ones(4)), tmp_path / "a")  # staged only
    with pytest.raises(OSError, match="disk on fire"):
        plugin.save_checkpoint(trainer_checkpoint(w=torch.ones(4)), tmp_path / "b")
    # b was still staged before a's error was raised; its own failure comes at teardown
    with pytest.raises(OSError, match="disk on fire"):
        plugin.teardown()
    assert plugin.checkpointer is None
    plugin.teardown()  # raised once, not again


def test_a_failing_background_save_fails_the_fit(tmp_path):
    plugin = AsyncCkptIO(executor="thread", storage_writer=lambda p, **options: FailingWriter(p))
    callback = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(max_steps=4, plugins=[plugin], callbacks=[callback])
    sigterm = signal.getsignal(signal.SIGTERM)
    with pytest.raises(OSError, match="disk on fire") as raised:
        trainer.fit(TinyModel())  # the step-2 save's error, raised by the step-4 save
    assert not (tmp_path / "epoch=0-step=2.ckpt" / "metadata.json").exists()
    # the step-4 save failed too: teardown did not replace the error, so Lightning's
    # own teardown ran to its end (it restores the signal handlers last)
    assert signal.getsignal(signal.SIGTERM) == sigterm
    if sys.version_info >= (3, 11):
        assert any("failed too" in note for note in raised.value.__notes__)
    assert plugin.checkpointer is None and plugin.pending is None


def test_with_two_staging_buffers_the_next_save_does_not_wait(tmp_path, gate):
    """save_last=True saves each step twice; a second buffer lets the second go at once."""
    stager = async_ckpt.Stager(num_buffers=2)
    plugin = AsyncCkptIO(executor="thread", stager=stager, storage_writer=held_writer(gate))
    plugin.save_checkpoint(trainer_checkpoint(w=torch.zeros(64)), tmp_path / "top.ckpt")
    wait_reached(gate, "before-write")
    first = plugin.pending
    # the gate holds the first save: this returns only because it did not wait for it
    plugin.save_checkpoint(trainer_checkpoint(w=torch.ones(64)), tmp_path / "last.ckpt")
    assert not first.done()
    (gate / "release").touch()
    plugin.teardown()
    stager.close()
    assert load_checkpoint(tmp_path / "top.ckpt")["w"].sum() == 0
    assert load_checkpoint(tmp_path / "last.ckpt")["w"].sum() == 64


def test_dicts_other_than_trainer_checkpoints_are_saved_synchronously(tmp_path):
    """The ddp_spawn launcher saves the weights and the main process reads them at once."""
    module = TinyModel()
    plugin = AsyncCkptIO(executor="thread")
    plugin.save_checkpoint(module.state_dict(), tmp_path / ".temp.ckpt")
    assert plugin.pending is None, "awaited before save_checkpoint returned"
    assert (tmp_path / ".temp.ckpt" / "metadata.json").is_file()
    loaded = plugin.load_checkpoint(tmp_path / ".temp.ckpt")
    assert_same_tree(loaded, module.state_dict())
    assert loaded._metadata == module.state_dict()._metadata
    plugin.teardown()


def test_storage_options_are_the_writer_options(tmp_path):
    made = []

    def writer(path, **options):
        made.append(options)
        return async_ckpt.FileSystemWriter(path, **options)

    plugin = AsyncCkptIO(executor="thread", storage_writer=writer)
    plugin.save_checkpoint(trainer_checkpoint(), tmp_path / "a", {"sync_files": False})
    with pytest.raises(TypeError, match="dict of keyword options"):
        plugin.save_checkpoint(trainer_checkpoint(), tmp_path / "b", "fast")
    plugin.teardown()
    assert made == [{"sync_files": False}]


# ---------------------------------------------------------------------------- hyper-parameters
class Activation(enum.Enum):
    RELU = "relu"
    TANH = "tanh"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.05
    betas: tuple[float, float] = (0.9, 0.99)


@dataclasses.dataclass
class Config:
    hidden: int = 16
    activation: Activation = Activation.TANH
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)


@dataclasses.dataclass
class Reducing:
    """Not plain data: unpickling it calls whatever __reduce__ names."""

    size: int = 4

    def __reduce__(self):
        return (Reducing, (self.size,))


class ConfigModel(TinyModel):
    def __init__(self, config: Config, extra: Any = None) -> None:
        super().__init__(lr=config.optim.lr)
        self.save_hyperparameters()


def _fresh_allow_list(monkeypatch: pytest.MonkeyPatch, baseline: set) -> None:
    """What a new process has: the built-in allow-list, none of this test's classes."""
    monkeypatch.setattr(allow_list, "_SAFE_GLOBALS", set(baseline))


def test_dataclass_hparams_are_allow_listed_at_save_and_load_back(tmp_path, monkeypatch):
    baseline = set(allow_list._SAFE_GLOBALS)
    _fresh_allow_list(monkeypatch, baseline)
    config = Config(hidden=12, activation=Activation.RELU, optim=OptimConfig(lr=0.02))
    trainer = make_trainer(
        max_steps=1, plugins=[AsyncCkptIO(executor="thread")], enable_checkpointing=False
    )
    trainer.fit(ConfigModel(config))
    trainer.save_checkpoint(tmp_path / "cfg.ckpt")
    trainer.strategy.checkpoint_io.teardown()
    names = {"test_lightning:Activation", "test_lightning:Config", "test_lightning:OptimConfig"}
    stored = async_ckpt.materialize(tmp_path / "cfg.ckpt")
    assert set(stored[RECORD_KEY]["classes"]) == names

    _fresh_allow_list(monkeypatch, baseline)  # as if loading in another process
    model = ConfigModel.load_from_checkpoint(tmp_path / "cfg.ckpt")
    assert model.hparams.config == config
    assert model.hparams.config.activation is Activation.RELU
    assert allow_list.is_allowed("test_lightning", "Config")


def test_hparams_classes_that_are_not_plain_data_are_refused_at_save(tmp_path, monkeypatch):
    baseline = set(allow_list._SAFE_GLOBALS)
    _fresh_allow_list(monkeypatch, baseline)
    trainer = make_trainer(
        max_steps=1, plugins=[AsyncCkptIO(executor="thread")], enable_checkpointing=False
    )
    trainer.fit(ConfigModel(Config(), extra=Reducing()))
    with pytest.raises(async_ckpt.UnsafeObjectError, match="test_lightning.Reducing"):
        trainer.save_checkpoint(tmp_path / "refused.ckpt")
    trainer.strategy.checkpoint_io.teardown()
    assert not allow_list.is_allowed("test_lightning", "Reducing")
    assert allow_list.is_allowed("test_lightning", "Config"), "the plain ones were allowed"
    # without the automatic allow-list, even plain dataclasses need allow_class
    _fresh_allow_list(monkeypatch, baseline)
    off = make_trainer(
        max_steps=1,
        plugins=[AsyncCkptIO(executor="thread", allow_hparams_classes=False)],
        enable_checkpointing=False,
    )
    off.fit(ConfigModel(Config()))
    with pytest.raises(async_ckpt.UnsafeObjectError, match="test_lightning"):
        off.save_checkpoint(tmp_path / "off.ckpt")
    async_ckpt.allow_class(Config)
    async_ckpt.allow_class(OptimConfig)
    async_ckpt.allow_class(Activation)
    off.save_checkpoint(tmp_path / "off.ckpt")
    off.strategy.checkpoint_io.teardown()
    assert (tmp_path / "off.ckpt" / "metadata.json").is_file()


def test_recorded_class_names_never_allow_code_or_import_modules(tmp_path, monkeypatch):
    _fresh_allow_list(monkeypatch, set(allow_list._SAFE_GLOBALS))
    names = [
        "os:system",
        "builtins:eval",
        "subprocess:Popen",
        "test_lightning:Reducing",  # imported, a dataclass, but not plain
        "async_ckpt_never_imported_module:Config",
        "test_lightning:Config",  # imported and plain: the one allowed
    ]
    async_ckpt.save(
        {"w": torch.ones(2), RECORD_KEY: {"classes": names}}, checkpoint_id=tmp_path / "c"
    )
    load_checkpoint(tmp_path / "c")
    assert [allow_list.is_allowed(*n.split(":")) for n in names] == [False] * 5 + [True]
    assert "async_ckpt_never_imported_module" not in sys.modules


# ---------------------------------------------------------------------------- DDP, 2 gloo ranks
class RunningGroup(ClusterEnvironment):
    """The process group run_ranks initialised already: Lightning launches nothing."""

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def main_port(self) -> int:
        return 0  # unused: the group exists

    @staticmethod
    def detect() -> bool:
        return False

    def world_size(self) -> int:
        return torch.distributed.get_world_size()

    def set_world_size(self, size: int) -> None:
        pass

    def global_rank(self) -> int:
        return torch.distributed.get_rank()

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        return torch.distributed.get_rank()

    def node_rank(self) -> int:
        return 0


def _ddp_rank(rank: int, world_size: int, root: str) -> dict[str, Any]:
    def trainer(steps: int, callbacks: list, plugin: AsyncCkptIO) -> pl.Trainer:
        strategy = DDPStrategy(cluster_environment=RunningGroup(), process_group_backend="gloo")
        return make_trainer(
            max_steps=steps,
            devices=world_size,
            strategy=strategy,
            plugins=[plugin],
            callbacks=callbacks,
        )

    def checkpoints() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, save_last=True)

    plugin = RecordingIO()
    trainer(4, [checkpoints()], plugin).fit(TinyModel())
    out: dict[str, Any] = {"saved": plugin.saved, "had_checkpointer": plugin.had_checkpointer}
    if rank == 0:
        out["stored_step"] = async_ckpt.materialize(os.path.join(root, "last.ckpt"))["global_step"]
    capture = Capture()
    resumed = TinyModel()
    trainer(6, [checkpoints(), capture], AsyncCkptIO()).fit(resumed, ckpt_path="last")
    out["start_step"] = capture.step
    out["weight"] = resumed.net[0].weight.detach().tolist()  # no tensors: they pass by fd
    return out


@pytest.mark.multiprocess
def test_ddp_two_ranks_save_on_rank_zero_alone_and_resume(tmp_path):
    from dist_utils import run_ranks

    root = str(tmp_path / "ddp")
    r0, r1 = run_ranks(_ddp_rank, 2, root)
    names = [os.path.basename(p) for p in r0["saved"]]
    assert names == ["epoch=0-step=2.ckpt", "last.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert r0["had_checkpointer"] and r0["stored_step"] == 4
    assert r1["saved"] == [] and not r1["had_checkpointer"], "rank 1 never saves"
    assert r0["start_step"] == r1["start_step"] == 4
    assert r0["weight"] == r1["weight"], "both ranks trained on from the same weights"
    assert (Path(root) / "epoch=1-step=6.ckpt" / "metadata.json").is_file()
