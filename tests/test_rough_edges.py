"""What a new user hit: misleading errors, a worker per Stager, whole-checkpoint reads.

Loads pointed at the wrong thing say what it is; key mismatches from a wrapper
module name both sides and the wrapper; ``async_save`` keeps one worker
whatever Stager objects it gets; parts of a checkpoint are read alone; the
safetensors converter streams; loads show progress when asked.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import async_ckpt as ac
from async_ckpt import api
from async_ckpt.storage.detect import detect_reader
from async_ckpt.tools.convert import to_safetensors


@pytest.fixture(autouse=True)
def _fresh_async_saves():
    yield
    ac.close_async_saves()


# --------------------------------------------------------------- loads of the wrong thing


def test_load_of_a_torch_save_file_says_what_it_is(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(ac.CheckpointNotFoundError, match="is a file.*torch.save file"):
        ac.load({"w": torch.zeros(2)}, checkpoint_id=path)


def test_load_of_a_manager_root_names_a_step_to_load(tmp_path):
    with ac.CheckpointManager(tmp_path, executor="thread") as manager:
        manager.save(5, {"w": torch.ones(2)})
        manager.save(6, {"w": torch.ones(2)})
    with pytest.raises(ac.CheckpointNotFoundError, match="directory of 2 checkpoints") as info:
        ac.load({"w": torch.zeros(2)}, checkpoint_id=tmp_path)
    assert "step-00000006" in str(info.value) and "restore" in str(info.value)


def test_an_empty_directory_is_still_an_incomplete_checkpoint(tmp_path):
    with pytest.raises(ac.IncompleteCheckpointError):
        ac.load({"w": torch.zeros(2)}, checkpoint_id=tmp_path)


# ---------------------------------------------------------- keys renamed by a wrapper


class _Wrapped(torch.nn.Module):
    """Stands for DDP (``module``) or torch.compile (``_orig_mod``): one more path component."""

    def __init__(self, attr: str) -> None:
        super().__init__()
        self.add_module(attr, torch.nn.Linear(3, 2))


@pytest.mark.parametrize(
    ("attr", "names"), [("module", "DistributedDataParallel"), ("_orig_mod", "torch.compile")]
)
@pytest.mark.parametrize("strict", [True, False])
def test_a_wrapper_prefix_is_named_with_both_sides(ckpt_dir, attr, names, strict):
    ac.save({"model": torch.nn.Linear(3, 2)}, checkpoint_id=ckpt_dir)
    with pytest.raises(ac.KeyMismatchError) as info:
        ac.load({"model": _Wrapped(attr)}, checkpoint_id=ckpt_dir, strict=strict)
    text = str(info.value)
    assert f"model.{attr}.weight" in text and "'model.weight'" in text  # both sides
    assert f"a {attr!r} path component" in text and names in text
    assert "strict=False cannot help" in text


def test_the_wrapper_is_found_when_the_checkpoint_has_it(ckpt_dir):
    ac.save({"model": _Wrapped("module")}, checkpoint_id=ckpt_dir)
    with pytest.raises(ac.KeyMismatchError, match="which the checkpoint side has"):
        ac.load({"model": torch.nn.Linear(3, 2)}, checkpoint_id=ckpt_dir)


def test_unrelated_missing_keys_get_no_wrapper_hint(ckpt_dir):
    ac.save({"a": torch.ones(1), "b": torch.ones(1)}, checkpoint_id=ckpt_dir)
    with pytest.raises(ac.KeyMismatchError) as info:
        ac.load({"a": torch.zeros(1), "c": torch.zeros(1)}, checkpoint_id=ckpt_dir)
    assert "path component" not in str(info.value)


# --------------------------------------------------------------- one worker for async_save


def test_async_save_with_a_new_equal_stager_each_call_keeps_one_checkpointer(tmp_path):
    seen = set()
    for n in range(4):
        stager = ac.Stager(ac.StagerOptions(num_buffers=1))
        ac.async_save({"w": torch.full((8,), n)}, checkpoint_id=tmp_path / f"{n}", stager=stager)
        seen.update(id(c) for c in api._DEFAULT.values())
    assert len(api._DEFAULT) == 1 and len(seen) == 1
    target = {"w": torch.zeros(8, dtype=torch.int64)}
    ac.close_async_saves()
    ac.load(target, checkpoint_id=tmp_path / "3")
    assert torch.equal(target["w"], torch.full((8,), 3))


def test_async_save_with_other_stager_options_replaces_the_checkpointer(tmp_path):
    ac.async_save({"w": torch.ones(4)}, checkpoint_id=tmp_path / "a").result()
    first = next(iter(api._DEFAULT.values()))
    stager = ac.Stager(ac.StagerOptions(num_buffers=2))
    ac.async_save({"w": torch.ones(4)}, checkpoint_id=tmp_path / "b", stager=stager).result()
    assert first._closed and len(api._DEFAULT) == 1
    assert next(iter(api._DEFAULT.values())).stager is stager


# ------------------------------------------------------------------ parts of a checkpoint


class _CountingReader(ac.StorageReader):
    def __init__(self, inner) -> None:
        self.inner, self.checkpoint_id, self.read_bytes = inner, inner.checkpoint_id, 0

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        return False

    def read_metadata(self):
        return self.inner.read_metadata()

    def file_size(self, name):
        return self.inner.file_size(name)

    def read_into(self, name, offset, dest):
        self.read_bytes += len(dest)
        self.inner.read_into(name, offset, dest)

    def close(self):
        self.inner.close()


def _big_state() -> dict:
    return {
        "model": {"w": torch.arange(64.0).reshape(8, 8), "b": torch.arange(8.0)},
        "optim": {"m": torch.ones(100_000), "step": 3},
        "pair": (1, torch.arange(3)),
    }


def test_materialize_keys_reads_only_the_selected_entries(ckpt_dir):
    ac.save(_big_state(), checkpoint_id=ckpt_dir)
    reader = _CountingReader(detect_reader(ckpt_dir))
    part = ac.materialize(keys=["model"], storage_reader=reader)
    assert set(part) == {"model"} and torch.equal(part["model"]["w"], _big_state()["model"]["w"])
    assert reader.read_bytes < 100_000  # optim.m (400 kB) was not read


def test_read_entry_by_key_and_by_prefix(ckpt_dir):
    ac.save(_big_state(), checkpoint_id=ckpt_dir)
    assert torch.equal(ac.read_entry(ckpt_dir, "model.b"), torch.arange(8.0))
    assert ac.read_entry(ckpt_dir, "optim.step") == 3
    assert torch.equal(ac.read_entry(ckpt_dir, "pair.1"), torch.arange(3))
    assert set(ac.read_entry(ckpt_dir, "model")) == {"w", "b"}
    with pytest.raises(ac.KeyMismatchError, match="no key 'model.x'"):
        ac.read_entry(ckpt_dir, "model.x")


def test_safetensors_conversion_streams_into_a_complete_file(ckpt_dir, tmp_path, capfd):
    ac.save(_big_state(), checkpoint_id=ckpt_dir)
    out = tmp_path / "out.safetensors"
    done = to_safetensors(ckpt_dir, out, progress=True)
    loaded = load_file(out)
    assert set(loaded) == {"model.w", "model.b", "optim.m", "pair.1"}
    assert torch.equal(loaded["optim.m"], torch.ones(100_000))
    assert done.skipped == ["optim.step", "pair.0"]
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert "convert" in capfd.readouterr().err  # the progress bar


def test_safetensors_conversion_refuses_a_dtype_it_cannot_hold(ckpt_dir, tmp_path):
    ac.save({"c": torch.ones(2, dtype=torch.complex128)}, checkpoint_id=ckpt_dir)
    with pytest.raises(ac.CheckpointError, match="'c'.*complex128"):
        to_safetensors(ckpt_dir, tmp_path / "out.safetensors")
    assert list(tmp_path.glob("out.safetensors*")) == []


def test_load_progress_bar_on_request(ckpt_dir, capfd):
    ac.save(_big_state(), checkpoint_id=ckpt_dir)
    target = ac.materialize(ckpt_dir)
    capfd.readouterr()
    ac.load(target, checkpoint_id=ckpt_dir)
    assert "load" not in capfd.readouterr().err
    ac.load(target, checkpoint_id=ckpt_dir, progress=True)
    assert f"load {ckpt_dir}" in capfd.readouterr().err


def test_cli_version(capsys):
    from async_ckpt.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"async-ckpt {ac.__version__}"


# -------------------------------------------------------------------------------- delete


def test_delete_removes_a_committed_checkpoint(ckpt_dir):
    ac.save({"w": torch.ones(2)}, checkpoint_id=ckpt_dir)
    ac.delete(ckpt_dir)
    assert not ckpt_dir.exists()
    ac.delete(ckpt_dir)  # already gone: no error


def test_delete_refuses_a_checkpoint_this_process_is_writing(tmp_path, gate):
    from faulty_storage import StopAtWriter

    target = tmp_path / "c"
    ac.save({"w": torch.zeros(8)}, checkpoint_id=target)  # committed: being overwritten now
    with ac.AsyncCheckpointer(executor="thread") as ckpt:
        held = StopAtWriter(target, gate=gate, point="before-write")
        future = ckpt.save({"w": torch.ones(8)}, storage_writer=held)
        with pytest.raises(ac.SaveInProgressError, match="being written by a save"):
            ac.delete(target)
        (gate / "release").touch()
        future.result(timeout=120)
    ac.delete(target)
    assert not target.exists()


def test_delete_refuses_a_recent_uncommitted_checkpoint_unless_forced(tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "abc-r0-0.data").write_bytes(b"x" * 10)  # as another process's save leaves it
    with pytest.raises(ac.SaveInProgressError, match="force=True"):
        ac.delete(partial)
    ac.delete(partial, force=True)
    assert not partial.exists()


def test_delete_wants_a_checkpoint_not_a_root():
    with pytest.raises(ValueError, match="name a checkpoint"):
        ac.delete("/")


# ----------------------------------------------------------------------- storage options


def test_manager_storage_options_reach_every_fsspec_call(memory_url, monkeypatch):
    from async_ckpt.storage import fsspec_backend

    seen = []
    real = fsspec_backend.open_filesystem

    def recording(checkpoint_id, storage_options):
        seen.append(dict(storage_options or {}))
        return real(checkpoint_id, storage_options)

    monkeypatch.setattr(fsspec_backend, "open_filesystem", recording)
    options = {"skip_instance_cache": True}
    with ac.CheckpointManager(memory_url, executor="thread", storage_options=options) as m:
        m.save(1, {"w": torch.ones(2)}).result()
        target = {"w": torch.zeros(2)}
        assert m.restore(target) == 1 and torch.equal(target["w"], torch.ones(2))
    assert len(seen) >= 3 and all(s == options for s in seen)  # root, writer, reader


def test_storage_options_for_a_local_root_are_refused(tmp_path):
    with pytest.raises(ValueError, match="apply to fsspec URLs"):
        ac.CheckpointManager(tmp_path, storage_options={"anon": True})


def test_cli_storage_option_becomes_fsspec_config(memory_url, monkeypatch, capsys):
    import fsspec.config

    from async_ckpt.cli import main

    monkeypatch.setattr(fsspec.config, "conf", {})
    ac.save({"w": torch.ones(2)}, checkpoint_id=memory_url)
    assert main(["-o", "skip_instance_cache=true", "-o", "tag=x", "inspect", memory_url]) == 0
    assert fsspec.config.conf["memory"] == {"skip_instance_cache": True, "tag": "x"}
    assert main(["-o", "novalue", "inspect", memory_url]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err
