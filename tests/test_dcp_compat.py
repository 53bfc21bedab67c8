"""Code written for torch.distributed.checkpoint runs with the import changed.

Keywords, planners, checkpointer types, stagers and futures of DCP are
honoured or accepted with a warning; DCP's storage objects passed by mistake
get a TypeError that says what to pass; loads follow DCP's semantics (the
target's keys decide, collective with a process group).
"""

from __future__ import annotations

import concurrent.futures
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from dist_utils import run_ranks
from helpers import wait_until
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType as TorchType

import async_ckpt as dcp
from async_ckpt import api


@pytest.fixture(autouse=True)
def _fresh_async_saves():
    yield
    dcp.close_async_saves()


def _state() -> dict:
    return {"model": {"w": torch.arange(12.0).reshape(3, 4)}, "step": 7, "tags": ["a", "b"]}


def _zeros() -> dict:
    return {"model": {"w": torch.zeros(3, 4)}, "step": 0, "tags": ["", ""]}


# ------------------------------------------------------------------ storage classes


def test_storage_classes_take_dcps_path_keyword(ckpt_dir):
    dcp.save(_state(), storage_writer=dcp.FileSystemWriter(path=ckpt_dir))
    target = _zeros()
    dcp.load(target, storage_reader=dcp.FileSystemReader(path=ckpt_dir))
    assert torch.equal(target["model"]["w"], _state()["model"]["w"]) and target["step"] == 7


def test_storage_classes_want_the_location_once(ckpt_dir):
    with pytest.raises(TypeError, match="not both"):
        dcp.FileSystemWriter(ckpt_dir, path=ckpt_dir)
    with pytest.raises(TypeError, match="missing the checkpoint location"):
        dcp.FileSystemReader()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("single_file_per_rank", False),
        ("per_thread_copy_ahead", 1 << 20),
        ("cache_staged_state_dict", True),
    ],
)
def test_dcp_writer_options_without_effect_warn_once_saying_why(ckpt_dir, option, value):
    with pytest.warns(UserWarning, match=f"{option}=.* has no effect in async_ckpt: ") as caught:
        writer = dcp.FileSystemWriter(ckpt_dir, **{option: value})
    assert len([w for w in caught if "has no effect" in str(w.message)]) == 1
    dcp.save(_state(), storage_writer=writer)
    target = _zeros()
    dcp.load(target, checkpoint_id=ckpt_dir)
    assert torch.equal(target["model"]["w"], _state()["model"]["w"])


def test_dcp_writer_positional_arguments_mean_the_same(ckpt_dir):
    # DCP's order: path, single_file_per_rank, sync_files, thread_count, copy ahead, overwrite
    with pytest.warns(UserWarning, match="single_file_per_rank"):
        writer = dcp.FileSystemWriter(ckpt_dir, True, False, 3, 10_000_000, False)
    assert (writer.sync_files, writer.thread_count, writer.overwrite) == (False, 3, False)


def test_overwrite_false_refuses_with_dcps_phrase(ckpt_dir):
    dcp.save(_state(), checkpoint_id=ckpt_dir)
    with pytest.raises(dcp.CheckpointExistsError, match="Checkpoint already exists"):
        dcp.save(_state(), storage_writer=dcp.FileSystemWriter(ckpt_dir, overwrite=False))
    dcp.save(_state(), storage_writer=dcp.FileSystemWriter(ckpt_dir, overwrite=True))


def test_fsspec_classes_take_path_and_fs_options(memory_url):
    dcp.save(_state(), storage_writer=dcp.FsspecWriter(path=memory_url, skip_instance_cache=True))
    target = _zeros()
    dcp.load(target, storage_reader=dcp.FsspecReader(path=memory_url))
    assert torch.equal(target["model"]["w"], _state()["model"]["w"])


def test_a_dcp_storage_writer_passed_by_mistake_is_a_type_error(ckpt_dir):
    with pytest.raises(
        TypeError, match=r"torch\.distributed\.checkpoint's.*async_ckpt\.FileSystemWriter"
    ):
        dcp.save(_state(), storage_writer=torch_dcp.FileSystemWriter(ckpt_dir))
    with pytest.raises(TypeError, match="async_ckpt.FileSystemWriter"):
        dcp.async_save(_state(), storage_writer=torch_dcp.FileSystemWriter(ckpt_dir))
    dcp.save(_state(), checkpoint_id=ckpt_dir)
    with pytest.raises(TypeError, match="async_ckpt.FileSystemReader"):
        dcp.load(_zeros(), storage_reader=torch_dcp.FileSystemReader(ckpt_dir))
    assert not (ckpt_dir / ".metadata").exists()  # DCP's writer was never used


# ------------------------------------------------------------------------- planners


def test_default_planners_are_accepted(ckpt_dir):
    dcp.save(_state(), checkpoint_id=ckpt_dir, planner=torch_dcp.DefaultSavePlanner())
    dcp.save(_state(), checkpoint_id=ckpt_dir, planner=dcp.DefaultSavePlanner())
    target = _zeros()
    dcp.load(target, checkpoint_id=ckpt_dir, planner=torch_dcp.DefaultLoadPlanner())
    assert target["step"] == 7


def test_a_partial_load_planner_loads_the_keys_present(ckpt_dir):
    dcp.save(_state(), checkpoint_id=ckpt_dir)
    for planner in (
        torch_dcp.DefaultLoadPlanner(allow_partial_load=True),
        dcp.DefaultLoadPlanner(allow_partial_load=True),
    ):
        target = {**_zeros(), "new": torch.zeros(2)}
        result = dcp.load(target, checkpoint_id=ckpt_dir, planner=planner)
        assert result.missing_keys == ["new"] and target["step"] == 7


def test_a_custom_planner_is_refused_naming_the_alternative(ckpt_dir):
    class MySavePlanner(torch_dcp.DefaultSavePlanner):
        pass

    class MyLoadPlanner(torch_dcp.DefaultLoadPlanner):
        pass

    with pytest.raises(NotImplementedError, match="custom save planner.*planner=None"):
        dcp.save(_state(), checkpoint_id=ckpt_dir, planner=MySavePlanner())
    assert not ckpt_dir.exists()
    dcp.save(_state(), checkpoint_id=ckpt_dir)
    with pytest.raises(NotImplementedError, match="custom load planner.*allow_partial_load"):
        dcp.load(_zeros(), checkpoint_id=ckpt_dir, planner=MyLoadPlanner())


# ----------------------------------------------------------------- async_save options


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (TorchType.THREAD, "thread"),
        (TorchType.PROCESS, "process"),
        (dcp.AsyncCheckpointerType.THREAD, "thread"),
        ("process", "process"),
    ],
)
def test_async_checkpointer_type_chooses_the_executor(tmp_path, given, expected):
    future = dcp.async_save(
        _state(), checkpoint_id=tmp_path / "c", async_checkpointer_type=given, no_dist=True
    )
    future.result()
    assert [key[0] for key in api._DEFAULT] == [expected]
    target = _zeros()
    dcp.load(target, checkpoint_id=tmp_path / "c")
    assert target["tags"] == ["a", "b"]


def test_conflicting_executor_choices_are_refused(ckpt_dir):
    with pytest.raises(ValueError, match="disagree"):
        dcp.async_save(
            _state(), checkpoint_id=ckpt_dir, executor="process", async_checkpointer_type="thread"
        )
    with pytest.raises(ValueError, match="AsyncCheckpointerType"):
        dcp.async_save(_state(), checkpoint_id=ckpt_dir, async_checkpointer_type="fork")


def test_dcp_stager_maps_onto_one_reused_stager(tmp_path):
    options = StagingOptions(
        use_pinned_memory=False,
        use_shared_memory=False,
        use_async_staging=True,
        use_non_blocking_copy=False,
    )
    stager = DefaultStager(options)
    try:
        for n in range(2):
            response = dcp.async_save(
                _state(),
                checkpoint_id=tmp_path / f"c{n}",
                async_stager=stager,
                async_checkpointer_type=TorchType.THREAD,
            )
            # DCP's AsyncSaveResponse surface: two plain concurrent futures
            assert response.staging_completion.result(timeout=60) is None
            done, _ = concurrent.futures.wait([response.upload_completion], timeout=60)
            assert done and isinstance(response.upload_completion.result(), dcp.Metadata)
    finally:
        stager.close()
    assert len(api._DEFAULT) == 1  # one checkpointer, one staging buffer for both saves
    ours = next(iter(api._DEFAULT.values())).stager
    assert ours.options.async_staging is True and ours.options.pin_memory is False


def test_a_custom_stager_is_refused(ckpt_dir):
    class MyStager:
        def stage(self, state_dict):
            return state_dict

    with pytest.raises(NotImplementedError, match="custom stager"):
        dcp.async_save(_state(), checkpoint_id=ckpt_dir, async_stager=MyStager())


def test_use_collectives_false_warns_and_saves(ckpt_dir):
    with pytest.warns(UserWarning, match="use_collectives=False has no effect"):
        dcp.save(_state(), checkpoint_id=ckpt_dir, use_collectives=False)
    assert (ckpt_dir / "metadata.json").exists()


def test_deprecated_names_map_with_a_future_warning(ckpt_dir):
    with pytest.warns(FutureWarning, match="save_state_dict is deprecated"):
        dcp.save_state_dict(_state(), dcp.FileSystemWriter(ckpt_dir))
    target = _zeros()
    with pytest.warns(FutureWarning, match="load_state_dict is deprecated"):
        dcp.load_state_dict(target, dcp.FileSystemReader(ckpt_dir), no_dist=True)
    assert target["step"] == 7


def test_checkpoint_exception_catches_our_errors(ckpt_dir):
    with pytest.raises(dcp.CheckpointException):
        dcp.load(_zeros(), checkpoint_id=ckpt_dir)  # nothing there


def test_stateful_app_state_as_in_dcps_tutorial(ckpt_dir):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.stateful import Stateful

    class AppState(Stateful):
        def __init__(self, model, optimizer):
            self.model, self.optimizer = model, optimizer

        def state_dict(self):
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            return {"model": model_sd, "optim": optim_sd}

        def load_state_dict(self, state_dict):
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state_dict["model"],
                optim_state_dict=state_dict["optim"],
            )

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=0.01)

    def step(model, optim, n):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(n))
        model(x).square().sum().backward()
        optim.step()
        optim.zero_grad()

    model, optim = build()
    for n in range(3):
        step(model, optim, n)
    dcp.save({"app": AppState(model, optim)}, checkpoint_id=ckpt_dir)
    step(model, optim, 3)
    expected = [p.detach().clone() for p in model.parameters()]

    resumed, resumed_optim = build()
    dcp.load({"app": AppState(resumed, resumed_optim)}, checkpoint_id=ckpt_dir)
    step(resumed, resumed_optim, 3)
    for a, b in zip(resumed.parameters(), expected, strict=True):
        assert torch.equal(a.detach(), b)


# ------------------------------------------------------------------ collective load


def _one_rank_lacks_a_key(rank, world_size, root):
    import torch.distributed as dist

    if rank == 0:
        dcp.save({"w": torch.ones(4)}, checkpoint_id=root, no_dist=True)
    dist.barrier()
    target = {"w": torch.zeros(4)}
    if rank == 1:
        target["extra"] = torch.zeros(1)
    try:
        dcp.load(target, checkpoint_id=root)
    except dcp.LoadFailedError as exc:
        return ("LoadFailedError", sorted(exc.failures), str(exc))
    except dcp.KeyMismatchError as exc:
        return ("KeyMismatchError", exc.missing, str(exc))
    return ("loaded", None, None)


@pytest.mark.multiprocess
def test_a_key_error_on_one_rank_fails_the_load_on_every_rank(tmp_path):
    results = run_ranks(_one_rank_lacks_a_key, 2, str(tmp_path / "c"))
    assert results[1][:2] == ("KeyMismatchError", ["extra"])
    assert results[0][:2] == ("LoadFailedError", [1])
    assert "Missing key in checkpoint state_dict" in results[0][2]


class _HeldReader(dcp.StorageReader):
    """Rank 1's reader: its first data read waits until the test lets it go."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        return False

    def __init__(self, inner, gate: Path) -> None:
        self.inner, self.gate = inner, gate
        self.checkpoint_id = inner.checkpoint_id
        self.coalesce_reads = inner.coalesce_reads

    def read_metadata(self):
        return self.inner.read_metadata()

    def file_size(self, name):
        return self.inner.file_size(name)

    def read_into(self, name, offset, dest):
        (self.gate / "held").touch()
        wait_until(lambda: (self.gate / "go").exists(), 60, "the test to release the read")
        self.inner.read_into(name, offset, dest)

    def close(self):
        self.inner.close()


def _load_waits_for_every_rank(rank, world_size, root, gate):
    import shutil
    import time

    import torch.distributed as dist

    from async_ckpt.storage.detect import detect_reader

    if rank == 0:
        dcp.save({"w": torch.arange(8.0)}, checkpoint_id=root, no_dist=True)
    dist.barrier()
    target = {"w": torch.zeros(8)}
    if rank == 1:
        dcp.load(target, storage_reader=_HeldReader(detect_reader(root), Path(gate)))
        return ("read", time.monotonic(), target["w"].tolist())
    done = threading.Event()
    loader = threading.Thread(target=lambda: (dcp.load(target, checkpoint_id=root), done.set()))
    loader.start()
    wait_until(lambda: (Path(gate) / "held").exists(), 60, "rank 1 to start reading")
    # rank 1 is held inside its read: a collective load cannot have returned here
    returned_early = done.wait(0.5)
    (Path(gate) / "go").touch()
    loader.join(60)
    returned_at = time.monotonic()
    shutil.rmtree(root)  # DCP code deletes or rotates a checkpoint right after loading it
    return ("returned", returned_early, returned_at, target["w"].tolist())


@pytest.mark.multiprocess
def test_load_returns_on_every_rank_only_when_all_ranks_have_read(tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    r0, r1 = run_ranks(_load_waits_for_every_rank, 2, str(tmp_path / "c"), str(gate))
    assert r0[1] is False  # rank 0's load was still waiting while rank 1 read
    assert r0[3] == r1[2] == list(range(8))


def _no_dist_loads_alone(rank, world_size, root):
    import torch.distributed as dist

    if rank == 0:
        dcp.save({"w": torch.ones(2)}, checkpoint_id=root, no_dist=True)
    dist.barrier()
    if rank == 0:  # rank 1 never calls load: a collective load would hang here
        target = {"w": torch.zeros(2)}
        dcp.load(target, checkpoint_id=root, no_dist=True)
        return target["w"].tolist()
    return None


@pytest.mark.multiprocess
def test_no_dist_load_on_one_rank_of_a_group(tmp_path):
    assert run_ranks(_no_dist_loads_alone, 2, str(tmp_path / "c"))[0] == [1.0, 1.0]


def test_warnings_are_not_raised_for_plain_calls(ckpt_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dcp.save(_state(), storage_writer=dcp.FileSystemWriter(ckpt_dir, sync_files=False))
        dcp.load(_zeros(), checkpoint_id=ckpt_dir)


def test_shape_mismatch_keeps_dcps_phrase(ckpt_dir):
    dcp.save({"w": torch.ones(2, 3)}, checkpoint_id=ckpt_dir)
    with pytest.raises(dcp.ShapeMismatchError, match=r"Size mismatch between saved \[2, 3\]"):
        dcp.load({"w": torch.zeros(3, 2)}, checkpoint_id=ckpt_dir)
