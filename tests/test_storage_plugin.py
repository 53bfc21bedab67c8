"""A third-party storage backend, added through the ``async_ckpt.storage`` entry point.

The toy backend below lives in a throw-away distribution written to a temporary
directory and put on ``sys.path``; the async_ckpt package is not touched. It
stores files in a dict of this process under ``toy://`` URLs. The conformance
suite runs on it too (``tests/test_storage_conformance.py``, backend "toy",
which installs it with :func:`install_toy_plugin`).
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import async_ckpt
from async_ckpt.storage import (
    ENTRY_POINT_GROUP,
    FileSystemWriter,
    FsspecWriter,
    StorageBackend,
    backends,
    detect_reader,
    detect_root,
    detect_writer,
    register_backend,
)

TOY_MODULE = '''
"""A toy storage backend: files live in a dict of this process, under toy:// URLs."""

import threading
import time

from async_ckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from async_ckpt.format.names import DATA_FILE, METADATA_FILE
from async_ckpt.storage import (
    StorageBackend,
    StorageReader,
    StorageRoot,
    StorageWriter,
    Usage,
)

SCHEME = "toy://"
FILES = {}  # "<path>/<name>" -> (bytes, modification time)
LOCK = threading.Lock()


def path_of(url):
    return str(url).removeprefix(SCHEME).rstrip("/")


def files_in(path):
    """The files directly in ``path``: {name: (bytes, mtime)}."""
    start = path + "/"
    with LOCK:
        return {
            key[len(start):]: value
            for key, value in FILES.items()
            if key.startswith(start) and "/" not in key[len(start):]
        }


class ToyWriter(StorageWriter):
    visible_across_processes = False  # a dict in this process
    thread_count = 2

    def __init__(self, checkpoint_id, *, overwrite=True):
        self.checkpoint_id = str(checkpoint_id)
        self.path = path_of(checkpoint_id)
        self.overwrite = overwrite

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        return str(checkpoint_id).startswith(SCHEME)

    def prepare(self, *, coordinator):
        if coordinator and not self.overwrite and self.committed_metadata() is not None:
            raise CheckpointExistsError(f"checkpoint {self.checkpoint_id!r} already exists")

    def write_file(self, name, segments):
        data = b"".join(seg.tobytes() for seg in segments)
        with LOCK:
            FILES[f"{self.path}/{name}"] = (data, time.time())

    def commit(self, metadata):
        with LOCK:
            previous = FILES.get(f"{self.path}/{METADATA_FILE}")
            FILES[f"{self.path}/{METADATA_FILE}"] = (bytes(metadata), time.time())
        return None if previous is None else previous[0]

    def committed_metadata(self):
        with LOCK:
            entry = FILES.get(f"{self.path}/{METADATA_FILE}")
        return None if entry is None else entry[0]

    def missing_files(self, names):
        present = files_in(self.path)
        return [name for name in names if name not in present]

    def remove_files(self, names):
        with LOCK:
            return [n for n in names if FILES.pop(f"{self.path}/{n}", None) is not None]

    def sweep_orphans(self, keep, older_than_s):
        keep = set(keep)
        cutoff = time.time() - older_than_s
        groups, newest = {}, {}
        for name, (_, mtime) in files_in(self.path).items():
            match = DATA_FILE.match(name)
            if match and name not in keep:
                groups.setdefault(match["save_id"], []).append(name)
                newest[match["save_id"]] = max(newest.get(match["save_id"], 0.0), mtime)
        return self.remove_files(
            [name for sid, names in groups.items() if newest[sid] < cutoff for name in names]
        )

    def abort(self, names):
        self.remove_files(names)


class ToyReader(StorageReader):
    def __init__(self, checkpoint_id):
        self.checkpoint_id = str(checkpoint_id)
        self.path = path_of(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        return ToyWriter.validate_checkpoint_id(checkpoint_id)

    def read_metadata(self):
        files = files_in(self.path)
        if METADATA_FILE in files:
            return files[METADATA_FILE][0]
        if files:
            raise IncompleteCheckpointError(f"{self.checkpoint_id!r} has no {METADATA_FILE}")
        raise CheckpointNotFoundError(f"no checkpoint at {self.checkpoint_id!r}")

    def _data(self, name):
        with LOCK:
            entry = FILES.get(f"{self.path}/{name}")
        if entry is None:
            raise CorruptCheckpointError(f"data file {name!r} of {self.checkpoint_id!r} is missing")
        return entry[0]

    def read_into(self, name, offset, dest):
        view = dest.cast("B") if dest.format != "B" else dest
        piece = self._data(name)[offset : offset + len(view)]
        if len(piece) != len(view):
            raise CorruptCheckpointError(f"data file {name!r} is truncated")
        view[:] = piece

    def file_size(self, name):
        return len(self._data(name))


class ToyRoot(StorageRoot):
    def __init__(self, root):
        self.root = str(root)
        self.path = path_of(root)

    def exists(self):
        with LOCK:
            return any(key.startswith(self.path + "/") for key in FILES)

    def children(self):
        start = self.path + "/"
        with LOCK:
            keys = list(FILES)
        found = {}
        for key in keys:
            child, _, name = key[len(start):].partition("/")
            if key.startswith(start) and name and "/" not in name:
                found[child] = found.get(child, False) or name == METADATA_FILE
        return found

    def usage(self, name):
        files = files_in(f"{self.path}/{name}").values()
        newest = max((mtime for _, mtime in files), default=None)
        return Usage(sum(len(data) for data, _ in files), newest)

    def delete(self, name):
        start = f"{self.path}/{name}/"
        with LOCK:
            FILES.pop(start + METADATA_FILE, None)  # the commit record first
            for key in [key for key in FILES if key.startswith(start)]:
                del FILES[key]

    def identity(self, name):
        return f"toy:{self.path}/{name}"


BACKEND = StorageBackend("toy", ToyWriter, ToyReader, ToyRoot)
'''


def _distribution(directory: Path, name: str, module: str | None, entry_points: str) -> None:
    """Write an installed-looking distribution (a module and its ``*.dist-info``)."""
    directory.mkdir(parents=True, exist_ok=True)
    if module is not None:
        (directory / f"{name}.py").write_text(module)
    info = directory / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_points}\n")


def install_toy_plugin(directory: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Install the toy backend's distribution into ``directory``, put it on ``sys.path``
    (undone by ``monkeypatch``), and return its module (imported once per process: its
    files are shared by every test)."""
    _distribution(directory, "toy_storage", TOY_MODULE, "toy = toy_storage:BACKEND")
    monkeypatch.syspath_prepend(str(directory))
    return importlib.import_module("toy_storage")


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    module = install_toy_plugin(tmp_path / "site", monkeypatch)
    yield module
    with module.LOCK:
        module.FILES.clear()


def test_detection_finds_the_plugin_before_fsspec(toy: ModuleType) -> None:
    assert type(detect_writer("toy://bucket/ckpt")) is toy.ToyWriter
    assert type(detect_reader("toy://bucket/ckpt")) is toy.ToyReader
    assert type(detect_root("toy://bucket")) is toy.ToyRoot
    names = [b.name for b in backends()]
    assert names[0] == "local" and names[-1] == "fsspec" and "toy" in names
    # the built-in backends still take their ids
    assert type(detect_writer("memory://x/y")) is FsspecWriter
    assert type(detect_writer("/tmp/x")) is FileSystemWriter


def test_without_the_plugin_toy_urls_cannot_be_detected() -> None:
    assert "toy" not in [b.name for b in backends()]
    with pytest.raises(async_ckpt.StorageDetectionError, match="Cannot detect"):
        detect_writer("toy://bucket/ckpt")


def test_save_and_load_through_the_plugin(toy: ModuleType) -> None:
    state = {"w": torch.arange(12.0).reshape(3, 4), "step": 7}
    meta = async_ckpt.save(state, checkpoint_id="toy://bucket/one")
    assert set(meta.files) <= set(toy.files_in("bucket/one"))
    target = {"w": torch.zeros(3, 4), "step": 0}
    async_ckpt.load(target, checkpoint_id="toy://bucket/one")
    assert torch.equal(target["w"], state["w"]) and target["step"] == 7


def test_a_process_local_plugin_is_refused_by_the_process_executor(toy: ModuleType) -> None:
    with async_ckpt.AsyncCheckpointer(executor="process") as ckpt:
        with pytest.raises(async_ckpt.CheckpointError, match="executor='thread'"):
            ckpt.save({"w": torch.ones(2)}, checkpoint_id="toy://bucket/refused")


def test_manager_saves_restores_and_retains_on_the_plugin(
    toy: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    # a crash's leftover, untouched for two hours: removed when the manager starts
    toy.FILES["run/step-00000099/0123abcd-r0-0.data"] = (b"partial", time.time() - 7200)
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        manager = async_ckpt.CheckpointManager("toy://run", executor="thread", keep_last=2)
    with manager:
        assert "removed incomplete checkpoint toy://run/step-00000099" in caplog.text
        for step in range(1, 5):
            manager.save(step, {"w": torch.full((64,), float(step)), "step": step})
        manager.wait()
        assert manager.steps() == [3, 4]
        assert detect_root("toy://run").children() == {
            "step-00000003": True,
            "step-00000004": True,
        }
        restored: dict[str, Any] = {"w": torch.zeros(64), "step": -1}
        assert manager.restore(restored) == 4
        assert torch.equal(restored["w"], torch.full((64,), 4.0)) and restored["step"] == 4


def test_a_broken_entry_point_warns_and_the_others_still_load(
    toy: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken-site"
    _distribution(
        broken,
        "broken_storage",
        "NOT_A_BACKEND = 42\n",
        "gone = no_such_module_anywhere:BACKEND\nwrong = broken_storage:NOT_A_BACKEND",
    )
    monkeypatch.syspath_prepend(str(broken))
    with pytest.warns(RuntimeWarning) as caught:
        writer = detect_writer("toy://bucket/still-found")
    messages = " ".join(str(w.message) for w in caught)
    assert "'gone'" in messages and "no_such_module_anywhere" in messages
    assert "'wrong'" in messages and "NOT_A_BACKEND" in messages
    assert type(writer) is toy.ToyWriter
    assert type(detect_writer("memory://x/y")) is FsspecWriter


def test_register_backend_at_run_time(toy: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    import async_ckpt.storage.registry as registry

    monkeypatch.setattr(registry, "_registered", [])
    mine = StorageBackend("mine", toy.ToyWriter, toy.ToyReader)
    register_backend(mine)
    assert [b.name for b in backends()][:3] == ["local", "mine", "toy"]
    assert detect_writer("toy://x").__class__ is toy.ToyWriter
    with pytest.raises(TypeError, match="StorageWriter"):
        StorageBackend("bad", toy.ToyReader, toy.ToyReader)
    with pytest.raises(TypeError, match="StorageBackend"):
        register_backend(toy.ToyWriter)  # type: ignore[arg-type]


def test_a_backend_without_a_root_cannot_serve_a_manager(
    toy: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import async_ckpt.storage.registry as registry

    monkeypatch.setattr(registry, "_registered", [])
    register_backend(StorageBackend("rootless", toy.ToyWriter, toy.ToyReader))
    with pytest.raises(async_ckpt.StorageDetectionError, match="rootless"):
        async_ckpt.CheckpointManager("toy://run", executor="thread")


def test_a_plugin_that_raises_while_detecting_is_skipped_with_a_warning(
    toy: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import async_ckpt.storage.registry as registry

    class Raising(toy.ToyWriter):
        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id: str) -> bool:
            raise ValueError("no idea")

    monkeypatch.setattr(registry, "_registered", [])
    register_backend(StorageBackend("raising", Raising, toy.ToyReader))
    with pytest.warns(RuntimeWarning, match="'raising' raised ValueError"):
        writer = detect_writer("memory://still/detected")
    assert type(writer) is FsspecWriter
