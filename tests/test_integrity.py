"""The invariant: a save whose future succeeds leaves a checkpoint that loads, bit-exact.

Concurrent writers to one id, metadata the reader would refuse, damaged metadata
bytes, failed commits, hostile files in place of metadata, leaves that cannot be
stored as given, and loads that would change values (issue 13).
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import threading

import numpy as np
import pytest
import torch
from helpers import data_files

import async_ckpt
from async_ckpt import (
    CheckpointError,
    CorruptCheckpointError,
    FileSystemWriter,
    FsspecWriter,
    MetadataError,
    SaveFailedError,
    ShapeMismatchError,
    StateDictError,
)
from async_ckpt.format import decode as metadata_decode
from async_ckpt.format.decode import decode_metadata
from async_ckpt.tools.verify import verify_checkpoint


def _state(value: float) -> dict:
    return {
        "w": torch.full((64, 64), value),
        "b": torch.full((7,), value, dtype=torch.float64),
        "value": value,
    }


def _target() -> dict:
    return {"w": torch.zeros(64, 64), "b": torch.zeros(7, dtype=torch.float64), "value": 0.0}


def _loaded_value(checkpoint_id) -> float:
    """Load the checkpoint and check that every leaf loaded came from one save."""
    target = _target()
    async_ckpt.load(target, checkpoint_id=checkpoint_id, strict=False)
    value = target["value"]
    assert torch.equal(target["w"], torch.full((64, 64), value))
    assert torch.equal(target["b"], torch.full((7,), value, dtype=torch.float64))
    return value


# ---------------------------------------------------------------------------- concurrent writers


def _held_before_commit(base: type):
    """A writer class whose commit waits for ``release`` after signalling ``reached``."""

    class Held(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.reached, self.release = threading.Event(), threading.Event()

        def commit(self, metadata: bytes) -> bytes | None:
            self.reached.set()
            assert self.release.wait(120), "the test never released the held commit"
            return super().commit(metadata)

    return Held


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_two_saves_to_one_id_at_once_leave_the_last_commit_loadable(backend, ckpt_dir, memory_url):
    """Was: the second commit deleted the first save's files in progress; both futures
    succeeded and the surviving checkpoint failed to load ('... is missing')."""
    cid = str(ckpt_dir) if backend == "local" else memory_url
    base = FileSystemWriter if backend == "local" else FsspecWriter
    first = _held_before_commit(base)(cid)
    errors: list[BaseException] = []

    def save_first() -> None:
        try:
            async_ckpt.save(_state(1.0), storage_writer=first)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=save_first)
    thread.start()
    assert first.reached.wait(120)  # its data files are written, its commit is held
    async_ckpt.save(_state(2.0), checkpoint_id=cid)  # a second writer commits meanwhile
    assert _loaded_value(cid) == 2.0
    first.release.set()
    thread.join(120)
    assert not thread.is_alive() and errors == []
    assert _loaded_value(cid) == 1.0  # the last commit wins, and it loads
    if backend == "local":  # the replaced save's files went with it; nothing else is left
        meta = decode_metadata((ckpt_dir / "metadata.json").read_bytes())
        assert data_files(ckpt_dir) == sorted(meta.files)


def _save_repeatedly(path: str, value: float, rounds: int, start) -> None:
    start.wait()
    # big enough that writes overlap: four data files of 2 MiB, each fsynced
    ballast = {f"ballast{i}": torch.full((512 * 1024,), value) for i in range(4)}
    for _ in range(rounds):
        async_ckpt.save({**_state(value), **ballast}, checkpoint_id=path)


@pytest.mark.multiprocess
def test_two_processes_overwriting_one_id_never_break_it(tmp_path):
    path = str(tmp_path / "latest")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_save_repeatedly, args=(path, float(v), 8, start)) for v in (1, 2)]
    for p in procs:
        p.start()
    start.set()
    values = set()
    for p in procs:
        while p.is_alive():  # loads racing the overwrites: bit-exact, or a clear error
            try:
                values.add(_loaded_value(path))
            except CheckpointError:
                pass
        p.join()
        assert p.exitcode == 0, "a save failed"
    assert _loaded_value(path) in (1.0, 2.0)
    assert values <= {1.0, 2.0}


def test_a_commit_that_finds_its_own_files_gone_refuses(ckpt_dir):
    async_ckpt.save(_state(1.0), checkpoint_id=ckpt_dir)

    class Vanishing(FileSystemWriter):
        def missing_files(self, names):
            for name in names:  # another process deleted this save's files before its commit
                os.unlink(self.path / name)
            return super().missing_files(names)

    with pytest.raises(SaveFailedError, match="are gone"):
        async_ckpt.save(_state(2.0), storage_writer=Vanishing(ckpt_dir))
    assert _loaded_value(ckpt_dir) == 1.0


# ---------------------------------------------------------------------------- metadata limits


def test_metadata_the_reader_would_refuse_is_never_committed(ckpt_dir, monkeypatch):
    async_ckpt.save(_state(1.0), checkpoint_id=ckpt_dir)
    before = (ckpt_dir / "metadata.json").read_bytes()
    monkeypatch.setattr(metadata_decode, "MAX_METADATA_BYTES", 64 * 1024)  # reader and check
    many_values = {f"v{i}": i for i in range(5000)}  # ~300 KiB of metadata
    with pytest.raises(SaveFailedError, match="a load would reject its metadata"):
        async_ckpt.save({**_state(2.0), **many_values}, checkpoint_id=ckpt_dir)
    assert (ckpt_dir / "metadata.json").read_bytes() == before
    assert _loaded_value(ckpt_dir) == 1.0


@pytest.mark.parametrize(
    "value",
    ["s" * (3 << 20), b"\x00\xff" * (3 << 19), 10**5000, -(2**5000)],
    ids=["3MiB-str", "3MiB-bytes", "5000-digit-int", "huge-negative-int"],
)
@pytest.mark.parametrize("executor", ["sync", "thread"])
def test_huge_plain_values_are_stored_as_data_and_load_back(value, executor, ckpt_dir):
    """Was: a 520 MiB string committed metadata past the reader's limit, and an int
    beyond JSON's digit limit failed in the background after the call returned."""
    state = {"v": value, "t": torch.ones(3)}
    if executor == "sync":
        async_ckpt.save(state, checkpoint_id=ckpt_dir)
    else:
        with async_ckpt.AsyncCheckpointer(executor="thread") as ckpt:
            ckpt.save(state, checkpoint_id=ckpt_dir).result()
    assert (ckpt_dir / "metadata.json").stat().st_size < 64 * 1024
    target = {"v": None, "t": torch.zeros(3)}
    async_ckpt.load(target, checkpoint_id=ckpt_dir)
    assert type(target["v"]) is type(value) and target["v"] == value


# ---------------------------------------------------------------------------- metadata checksum


def test_every_single_bit_flip_in_the_metadata_is_detected(ckpt_dir):
    """Was: 31 of ~2,200 flips silently changed loaded values (lr, step, a string)."""
    state = {"lr": 0.0003, "step": 1234, "name": "run-7", "blob": b"\x01\x02", "t": torch.ones(2)}
    async_ckpt.save(state, checkpoint_id=ckpt_dir)
    raw = (ckpt_dir / "metadata.json").read_bytes()
    accepted = []
    for bit in range(len(raw) * 8):
        damaged = bytearray(raw)
        damaged[bit // 8] ^= 1 << (bit % 8)
        try:
            decode_metadata(bytes(damaged))
        except MetadataError:
            continue
        accepted.append(bit)
    assert accepted == []


def test_a_damaged_metadata_byte_fails_load_and_verify_clearly(ckpt_dir):
    async_ckpt.save({"lr": 0.0003, "t": torch.ones(2)}, checkpoint_id=ckpt_dir)
    path = ckpt_dir / "metadata.json"
    raw = path.read_bytes()
    at = raw.index(b"0.0003")
    path.write_bytes(raw[:at] + b"1.0003" + raw[at + 6 :])  # still valid JSON, another value
    with pytest.raises(CorruptCheckpointError, match="own checksum"):
        async_ckpt.load({"lr": 0.0, "t": torch.zeros(2)}, checkpoint_id=ckpt_dir)
    with pytest.raises(CorruptCheckpointError, match="own checksum"):
        verify_checkpoint(ckpt_dir)


# ---------------------------------------------------------------------------- failed commits


def test_enospc_while_writing_the_metadata_leaves_no_temporary_file(ckpt_dir, monkeypatch):
    async_ckpt.save(_state(1.0), checkpoint_id=ckpt_dir)
    from async_ckpt.storage import local

    real_write_all = local.pwrite_all

    def full_disk(fd, data, offset):
        view = data.cast("B") if data.format != "B" else data
        if bytes(view[:12]) == b'{"checksum":':  # the metadata: half of it, then ENOSPC
            real_write_all(fd, view[: len(view) // 2], offset)
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        real_write_all(fd, data, offset)

    monkeypatch.setattr(local, "pwrite_all", full_disk)
    with pytest.raises(OSError, match="No space left"):
        async_ckpt.save(_state(2.0), checkpoint_id=ckpt_dir)
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith(".")) == []
    meta = decode_metadata((ckpt_dir / "metadata.json").read_bytes())
    assert data_files(ckpt_dir) == sorted(meta.files)  # the failed save's data files went too
    assert _loaded_value(ckpt_dir) == 1.0


# ---------------------------------------------------------------------------- hostile metadata files


def test_a_directory_named_metadata_json_is_a_clear_error(ckpt_dir):
    ckpt_dir.mkdir()
    (ckpt_dir / "metadata.json").mkdir()
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        async_ckpt.load({"a": 1}, checkpoint_id=ckpt_dir)


def test_an_oversized_metadata_file_is_refused_before_reading(ckpt_dir, monkeypatch):
    async_ckpt.save(_state(1.0), checkpoint_id=ckpt_dir)
    with open(ckpt_dir / "metadata.json", "r+b") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB as the file system reports it
    before = _bytes_read_by_this_process()
    with pytest.raises(MetadataError, match="above the"):
        async_ckpt.load(_target(), checkpoint_id=ckpt_dir)
    assert _bytes_read_by_this_process() - before < 16 << 20  # was 512 MiB read first


def _bytes_read_by_this_process() -> int:
    """Bytes this process read through read system calls so far (Linux)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


# ---------------------------------------------------------------------------- leaves as given


def _save_both_ways(state, path):
    async_ckpt.save(state, checkpoint_id=path / "sync")
    with async_ckpt.AsyncCheckpointer(executor="thread") as ckpt:
        ckpt.save(state, checkpoint_id=path / "async").result()


def test_conjugate_and_negative_views_save_the_values_they_show(tmp_path):
    """Was: a raw RuntimeError from the synchronous save (async saved them)."""
    z = torch.tensor([1 + 2j, 3 - 1j, -0.5 + 0.25j])
    state = {"conj": z.conj(), "neg": z.conj().imag, "plain": z}
    _save_both_ways(state, tmp_path)
    for mode in ("sync", "async"):
        target = {"conj": torch.zeros(3, dtype=z.dtype), "neg": torch.zeros(3), "plain": z * 0}
        async_ckpt.load(target, checkpoint_id=tmp_path / mode)
        assert torch.equal(target["conj"], z.conj().resolve_conj())
        assert torch.equal(target["neg"], -z.imag)
        assert torch.equal(target["plain"], z)


def test_big_endian_arrays_save_and_load_by_value(tmp_path):
    """Was: a raw ValueError from torch.from_numpy."""
    array = np.arange(6, dtype=">f8").reshape(2, 3) / 3
    _save_both_ways({"a": array, "i": np.arange(4, dtype=">i2")}, tmp_path)
    for mode in ("sync", "async"):
        target = {"a": None, "i": None}
        async_ckpt.load(target, checkpoint_id=tmp_path / mode)
        assert np.array_equal(target["a"], array) and target["a"].dtype == np.float64
        assert np.array_equal(target["i"], np.arange(4)) and target["i"].dtype.isnative


@pytest.mark.parametrize(
    "executor", ["sync", "thread", pytest.param("process", marks=pytest.mark.multiprocess)]
)
def test_a_key_that_is_not_valid_unicode_fails_at_the_call(executor, ckpt_dir):
    """Was: the async call returned and the save failed later in the background."""
    state = {"ok": torch.ones(2), "bad\ud800key": 1}
    with pytest.raises(StateDictError, match="not valid Unicode"):
        if executor == "sync":
            async_ckpt.save(state, checkpoint_id=ckpt_dir)
        else:
            with async_ckpt.AsyncCheckpointer(executor=executor) as ckpt:
                ckpt.save(state, checkpoint_id=ckpt_dir)  # raises here, not in .result()
    assert not (ckpt_dir / "metadata.json").exists()


# ---------------------------------------------------------------------------- lossy loads


@pytest.mark.parametrize(
    "stored, target_dtype",
    [
        (torch.tensor([0.5, 1.5]), torch.int64),
        (torch.tensor([1.25e10, 1.0]), torch.float16),
        (torch.tensor([1.0 + 2.0j, 3.0j]), torch.float32),
        (torch.tensor([2**53 + 1, 3], dtype=torch.int64), torch.float64),
    ],
    ids=["float-to-int", "float32-to-float16", "complex-to-real", "int64-to-float64"],
)
def test_a_lossy_cast_is_refused_unless_asked_for(stored, target_dtype, ckpt_dir):
    async_ckpt.save({"t": stored}, checkpoint_id=ckpt_dir)
    target = {"t": torch.full(stored.shape, 7, dtype=target_dtype)}
    with pytest.raises(ShapeMismatchError, match="allow_lossy_cast"):
        async_ckpt.load(target, checkpoint_id=ckpt_dir)
    assert torch.equal(target["t"], torch.full(stored.shape, 7, dtype=target_dtype))  # untouched
    async_ckpt.load(target, checkpoint_id=ckpt_dir, allow_lossy_cast=True)
    assert torch.equal(
        target["t"],
        stored.real.to(target_dtype) if stored.is_complex() else stored.to(target_dtype),
    )


def test_lossless_casts_load_without_asking(ckpt_dir):
    async_ckpt.save(
        {"f": torch.tensor([0.1, 2.5]), "i": torch.tensor([3, -4], dtype=torch.int32)},
        checkpoint_id=ckpt_dir,
    )
    target = {"f": torch.zeros(2, dtype=torch.float64), "i": torch.zeros(2, dtype=torch.int64)}
    async_ckpt.load(target, checkpoint_id=ckpt_dir)
    assert target["f"].tolist() == torch.tensor([0.1, 2.5]).double().tolist()
    assert target["i"].tolist() == [3, -4]


# ---------------------------------------------------------------------------- failed loads


def _damage_chunk_of(path, key: str) -> None:
    meta = decode_metadata((path / "metadata.json").read_bytes())
    chunk = meta.entries[key].chunks[0]
    with open(path / chunk.file, "r+b") as f:
        f.seek(chunk.offset)
        byte = f.read(1)
        f.seek(chunk.offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_failed_load_with_verify_first_leaves_the_target_untouched(ckpt_dir):
    state = {f"t{i}": torch.full((1000,), float(i + 1)) for i in range(6)}
    state["step"] = 5
    async_ckpt.save(state, checkpoint_id=ckpt_dir)
    _damage_chunk_of(ckpt_dir, "t4")
    target = {f"t{i}": torch.zeros(1000) for i in range(6)}
    target["step"] = 0
    with pytest.raises(CorruptCheckpointError, match="t4"):
        async_ckpt.load(target, checkpoint_id=ckpt_dir, verify_first=True)
    assert all(torch.equal(target[f"t{i}"], torch.zeros(1000)) for i in range(6))
    assert target["step"] == 0

    # Without it the error is the same and non-tensor leaves stay, but tensors read
    # before the damaged one may already hold the checkpoint's values.
    with pytest.raises(CorruptCheckpointError, match="t4"):
        async_ckpt.load(target, checkpoint_id=ckpt_dir)
    assert target["step"] == 0


def test_verify_first_loads_the_same_values(ckpt_dir):
    state = {"a": torch.randn(300, 40), "b": np.arange(10), "n": 3}
    async_ckpt.save(state, checkpoint_id=ckpt_dir)
    target = {
        "a": torch.zeros(300, 40, dtype=torch.float64),
        "b": np.zeros(10, dtype=np.int64),
        "n": 0,
    }
    async_ckpt.load(target, checkpoint_id=ckpt_dir, verify_first=True)
    assert torch.equal(target["a"], state["a"].double())
    assert np.array_equal(target["b"], state["b"]) and target["n"] == 3
