"""Hostile checkpoints: refused at load with a typed error, nothing run, nothing lost.

tests/test_corruption.py covers damaged bytes, the basic escaping names, symlinks
and huge declared sizes; this file adds the rest of the hostile inputs (more
pickle payloads, more names, absurd numbers, deep nesting). The state dicts that
``save`` must refuse before anything reaches the disk are in
tests/test_hostile_state_dicts.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import threading
from collections import OrderedDict

import pytest
import torch
from helpers import read_meta, reseal_object, write_meta

import async_ckpt
from async_ckpt import CorruptCheckpointError, MetadataError, UnsafeObjectError

# ---------------------------------------------------------------------------- pickle payloads


class Reduce:
    """Pickles as ``func(*args)``: the shape of every code-running payload."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _payloads(marker: str) -> dict[str, bytes]:
    import subprocess

    touch = f"touch {marker}"
    return {
        "os.system": pickle.dumps(Reduce(os.system, touch), protocol=4),
        "os.system-protocol0": pickle.dumps(Reduce(os.system, touch), protocol=0),
        # subprocess.run, not Popen: it returns once the command ran, so every payload
        # here that ran at all has touched the marker when loads() returns
        "subprocess.run": pickle.dumps(Reduce(subprocess.run, ["touch", marker]), protocol=2),
        "builtins.eval": pickle.dumps(Reduce(eval, f"open({marker!r}, 'w')"), protocol=4),
        "builtins.getattr": pickle.dumps(Reduce(getattr, object, "__subclasses__"), protocol=4),
        "__import__": pickle.dumps(Reduce(__import__, "os"), protocol=4),
        # Hidden inside allow-listed containers: the whole payload is checked, not its top.
        "inside-OrderedDict": pickle.dumps(
            OrderedDict(a=1, b=Reduce(os.system, touch)), protocol=4
        ),
        "inside-list": pickle.dumps([1, [2, Reduce(os.system, touch)]], protocol=4),
        # INST and GLOBAL opcodes written by hand (protocol 0 text pickles).
        "INST-opcode": f"(S'{touch}'\nios\nsystem\n.".encode(),
        "GLOBAL-posix": f"cposix\nsystem\n(S'{touch}'\ntR.".encode(),
        # copyreg._reconstructor is allow-listed; the class it rebuilds must be too.
        "reconstructor": b"\x80\x02ccopyreg\n_reconstructor\ncsubprocess\nPopen\n"
        b"c__builtin__\nobject\nN\x87R.",
        "persistent-id": b"\x80\x02X\x01\x00\x00\x00xQ.",
        "extension-code": b"\x80\x02\x82\x01.",
    }


@pytest.fixture(scope="module")
def object_checkpoint(tmp_path_factory):
    """A committed checkpoint with an object entry and a tensor, saved once for many tests."""
    path = tmp_path_factory.mktemp("objects") / "ckpt"
    async_ckpt.save({"obj": {1, 2}, "t": torch.arange(4.0)}, checkpoint_id=path)
    return path


@pytest.mark.parametrize("name", sorted(_payloads("m")))
def test_code_running_payloads_in_object_entries_are_refused(object_checkpoint, tmp_path, name):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(object_checkpoint, ckpt)
    marker = tmp_path / "pwned"
    reseal_object(ckpt, "obj", _payloads(str(marker))[name])  # valid checksum and sizes
    for verify in (True, False):
        target = {"obj": None, "t": torch.zeros(4)}
        with pytest.raises(UnsafeObjectError):
            async_ckpt.load(target, checkpoint_id=ckpt, verify=verify)
        assert target["obj"] is None  # nothing was placed
    assert not marker.exists()  # the payloads run synchronously (see _payloads)


def test_the_os_system_payload_is_live(tmp_path):
    """Control: the payloads above do run code when unpickled without the allow-list."""
    marker = tmp_path / "proof"
    pickle.loads(_payloads(str(marker))["os.system"])  # noqa: S301
    assert marker.exists()


def test_an_unlisted_but_harmless_class_is_refused_with_a_way_out(object_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(object_checkpoint, ckpt)
    reseal_object(ckpt, "obj", pickle.dumps(threading.Event, protocol=4))
    with pytest.raises(UnsafeObjectError, match=r"allow_global\('threading', 'Event'\)"):
        async_ckpt.load({"obj": None, "t": torch.zeros(4)}, checkpoint_id=ckpt)


def test_a_payload_asking_for_a_petabyte_fails_fast(object_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(object_checkpoint, ckpt)
    reseal_object(ckpt, "obj", pickle.dumps(Reduce(bytearray, 1 << 50), protocol=4))
    # Refused by the bytearray guard before anything is allocated, not a MemoryError
    # from trying ("object entry cannot be decoded: MemoryError"), nor a hang (the
    # suite's timeout).
    with pytest.raises(UnsafeObjectError, match="bytearray"):
        async_ckpt.load({"obj": None, "t": torch.zeros(4)}, checkpoint_id=ckpt)


@pytest.mark.parametrize(
    "payload",
    [Reduce(bytearray, 256 << 20), Reduce(__import__("fractions").Fraction, "1e1500000")],
    ids=["bytearray-256MiB", "Fraction-1e1500000"],
)
def test_allow_listed_callables_cannot_be_made_to_exhaust_memory_or_cpu(
    object_checkpoint, tmp_path, payload
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(object_checkpoint, ckpt)
    reseal_object(ckpt, "obj", pickle.dumps(payload, protocol=4))
    with pytest.raises(UnsafeObjectError):
        async_ckpt.load({"obj": None, "t": torch.zeros(4)}, checkpoint_id=ckpt)


# ---------------------------------------------------------------------------- names and links


@pytest.fixture
def saved(tmp_path):
    """A small committed checkpoint: a tensor, an object entry, a value."""
    path = tmp_path / "ckpt"
    async_ckpt.save({"w": torch.arange(1000.0), "obj": {1, 2}, "n": 3}, checkpoint_id=path)
    return path


def _target():
    return {"w": torch.zeros(1000), "obj": None, "n": 0}


def _rename_file(path, old: str, new: str) -> None:
    doc = read_meta(path)
    doc["files"][new] = doc["files"].pop(old)
    for entry in doc["entries"].values():
        for ref in [entry, *entry.get("chunks", [])]:
            if ref.get("file") == old:
                ref["file"] = new
    write_meta(path, doc)


BAD_NAMES = ["", ".", "a/b", "x.data\n", "x\x00.data", "a\\b", "~", "-r0-0.data", "x" * 201]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
@pytest.mark.parametrize("key", ["w", "obj"])
def test_data_file_names_that_are_not_one_plain_component_are_refused(saved, name, key):
    entry = read_meta(saved)["entries"][key]
    old = entry["file"] if "file" in entry else entry["chunks"][0]["file"]
    _rename_file(saved, old, name)
    with pytest.raises(MetadataError, match="file"):
        async_ckpt.load(_target(), checkpoint_id=saved)


def test_an_unreferenced_bad_name_in_files_is_refused_too(saved):
    doc = read_meta(saved)
    doc["files"]["../../etc/passwd"] = {"size": 1}
    write_meta(saved, doc)
    with pytest.raises(MetadataError, match="outside the checkpoint"):
        async_ckpt.load(_target(), checkpoint_id=saved)


def test_a_symlinked_object_data_file_is_refused(saved):
    name = read_meta(saved)["entries"]["obj"]["file"]
    outside = saved.parent / "outside.data"
    os.replace(saved / name, outside)
    os.symlink(outside, saved / name)
    with pytest.raises(CorruptCheckpointError, match="symlink|regular"):
        async_ckpt.load(_target(), checkpoint_id=saved)


def test_a_directory_in_place_of_a_data_file_is_refused(saved):
    name = read_meta(saved)["entries"]["w"]["chunks"][0]["file"]
    os.unlink(saved / name)
    os.mkdir(saved / name)
    with pytest.raises(CorruptCheckpointError, match="regular file"):
        async_ckpt.load(_target(), checkpoint_id=saved)


# ---------------------------------------------------------------------------- absurd numbers


def _edit(path, change) -> None:
    doc = read_meta(path)
    change(doc)
    write_meta(path, doc)


def _chunk(doc):
    return doc["entries"]["w"]["chunks"][0]


def _huge_shape(doc):
    doc["entries"]["w"]["shape"] = [2**40, 2**40]
    _chunk(doc).update(offsets=[0, 0], sizes=[2**40, 2**40])


def _huge_rank(doc):
    doc["entries"]["w"]["shape"] = [2**62] * 64
    _chunk(doc).update(offsets=[0] * 64, sizes=[2**62] * 64)


def _too_many_dims(doc):
    doc["entries"]["w"]["shape"] = [1] * 65
    _chunk(doc).update(offsets=[0] * 65, sizes=[1] * 65)


def _ten_million_checksums(doc):
    _chunk(doc)["checksums"] = [0] * 10_000_000


def _block(size):
    def change(doc):
        doc["checksum"]["block_size"] = size

    return change


ABSURD = {
    "shape [2**40, 2**40]": _huge_shape,
    "64 dims of 2**62": _huge_rank,
    "65 dims": _too_many_dims,
    "10 million checksums": _ten_million_checksums,
    "block_size 1": _block(1),
    "block_size 0": _block(0),
    "block_size 4095": _block(4095),
    "block_size 2**63": _block(2**63),
    "block_size as text": _block("4096"),
    "negative size": lambda doc: [f.update(size=-1) for f in doc["files"].values()],
    "size 2**64": lambda doc: [f.update(size=2**64) for f in doc["files"].values()],
    "offset 2**61 past the file": lambda doc: _chunk(doc).update(offset=2**61),
    "nbytes 2**62 - 1": lambda doc: _chunk(doc).update(nbytes=2**62 - 1),
    "world_size 0": lambda doc: doc.update(world_size=0),
}


@pytest.mark.parametrize("change", list(ABSURD.values()), ids=list(ABSURD))
def test_absurd_numbers_are_metadata_errors_found_quickly(saved, change):
    # "Quickly": a MetadataError, raised before any data is read or any of the sizes
    # asked for is allocated. Not timed: parsing the 30 MB of "10 million checksums"
    # alone takes seconds on a busy machine; a load that hangs hits the suite's timeout.
    _edit(saved, change)
    with pytest.raises(MetadataError):
        async_ckpt.load(_target(), checkpoint_id=saved)


def test_a_consistent_offset_of_2_61_is_refused_before_reading_or_allocating(saved):
    def far(doc):
        chunk = _chunk(doc)
        doc["files"][chunk["file"]]["size"] = 2**62  # consistent in itself
        chunk["offset"] = 2**61

    _edit(saved, far)
    with pytest.raises(CorruptCheckpointError, match="holds"):
        async_ckpt.load(_target(), checkpoint_id=saved)


def test_overlapping_chunks_that_add_up_to_the_shape_are_refused(tmp_path):
    path = tmp_path / "ckpt"
    async_ckpt.save({"t": torch.arange(8.0)}, storage_writer=_two_chunk_writer(path))
    doc = read_meta(path)
    chunks = doc["entries"]["t"]["chunks"]
    assert [c["offsets"] for c in chunks] == [[0], [4]]
    chunks[1]["offsets"] = [3]  # [0, 4) and [3, 7): element 7 is never written
    chunks[1]["sizes"] = [4]
    write_meta(path, doc)
    with pytest.raises(MetadataError):
        async_ckpt.load({"t": None}, checkpoint_id=path)


def _two_chunk_writer(path):
    """A metadata file with two chunks for one tensor, as two ranks' shards would write it."""
    from async_ckpt.format.decode import decode_metadata
    from async_ckpt.format.metadata import Chunk, TensorEntry, encode_metadata

    class TwoChunks(async_ckpt.FileSystemWriter):
        def commit(self, metadata: bytes) -> None:
            meta = decode_metadata(metadata)
            (whole,) = meta.entries["t"].chunks
            half = whole.nbytes // 2
            crcs = [
                __import__("crc32c").crc32c((self.path / whole.file).read_bytes()[a : a + half])
                for a in (whole.offset, whole.offset + half)
            ]
            chunks = (
                Chunk((0,), (4,), whole.file, whole.offset, half, (crcs[0],)),
                Chunk((4,), (4,), whole.file, whole.offset + half, half, (crcs[1],)),
            )
            entry = meta.entries["t"]
            entries = {"t": TensorEntry(entry.path, entry.dtype, entry.shape, chunks)}
            meta = dataclasses.replace(meta, entries=entries)
            super().commit(encode_metadata(meta))

    return TwoChunks(path, sync_files=False)


def test_the_two_chunk_control_loads(tmp_path):
    path = tmp_path / "ckpt"
    async_ckpt.save({"t": torch.arange(8.0)}, storage_writer=_two_chunk_writer(path))
    target = {"t": None}
    async_ckpt.load(target, checkpoint_id=path)
    assert torch.equal(target["t"], torch.arange(8.0))


# ---------------------------------------------------------------------------- deep nesting


@pytest.mark.parametrize("depth", [100, 980, 995, 5_000, 200_000])
@pytest.mark.parametrize("field", ["world_size", "path", "value", "extra", "whole"])
def test_deeply_nested_json_is_a_metadata_error_not_a_crash(saved, field, depth):
    raw = (saved / "metadata.json").read_text()
    doc = json.loads(raw)
    nest = "[" * depth + "]" * depth
    text = json.dumps(doc, separators=(",", ":"))
    replaced = {
        "world_size": ('"world_size":1', f'"world_size":{nest}'),
        "path": ('"path":["w"]', f'"path":["w",{nest}]'),
        "value": ('{"type":"int","value":3}', f'{{"type":"int","value":{nest}}}'),
        "extra": ('"extra":{}', f'"extra":{{"x":{nest}}}'),
        "whole": (text, nest),
    }[field]
    assert replaced[0] in text
    (saved / "metadata.json").write_text(text.replace(*replaced))
    try:
        async_ckpt.load(_target(), checkpoint_id=saved)
    except MetadataError:
        return
    # Only free-form "extra" may hold nesting the parser accepts; the load then succeeds.
    assert field == "extra"
