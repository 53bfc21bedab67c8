"""Damaged or hostile checkpoints are refused with a typed error, never loaded silently."""

from __future__ import annotations

import datetime
import os
import pickle

import pytest
import torch
from helpers import crc, read_meta, reseal_object, write_meta

import async_ckpt
from async_ckpt import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    MetadataError,
    StateDictError,
    UnsafeObjectError,
)
from async_ckpt.dist.comm import LocalComm
from async_ckpt.pipeline.save import run_save
from async_ckpt.pipeline.waves import memory_waves
from async_ckpt.planning.plan import Planner
from async_ckpt.state.describe import describe
from async_ckpt.state.flatten import flatten


class CreatesMarker:
    """Unpickling this creates a file: the proof that a payload's code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _evil_payload(marker) -> bytes:
    return pickle.dumps(CreatesMarker(str(marker)), protocol=4)


def _chunk(path, key):
    return read_meta(path)["entries"][key]["chunks"][0]


def _flip_bit(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


# ---------------------------------------------------------------------------- damaged data


def test_a_flipped_bit_raises_checksum_mismatch_naming_key_and_file(ckpt_dir, saved_small):
    chunk = _chunk(ckpt_dir, "w")
    _flip_bit(ckpt_dir / chunk["file"], chunk["offset"] + 1234)
    target = saved_small()
    with pytest.raises(ChecksumMismatchError) as info:
        async_ckpt.load(target, checkpoint_id=ckpt_dir)
    assert "'w'" in str(info.value) and chunk["file"] in str(info.value)
    assert "verify=False" in str(info.value)


def test_verify_false_loads_damaged_data_anyway(ckpt_dir, saved_small):
    chunk = _chunk(ckpt_dir, "w")
    _flip_bit(ckpt_dir / chunk["file"], chunk["offset"] + 4 * 10)  # element 10's low byte
    target = saved_small()
    async_ckpt.load(target, checkpoint_id=ckpt_dir, verify=False)
    expected = torch.arange(1000, dtype=torch.float32)
    assert target["w"][10].item() != 10.0
    assert torch.equal(target["w"][11:], expected[11:]) and torch.equal(
        target["w"][:10], expected[:10]
    )


def test_a_flip_in_a_later_block_is_found_and_located(ckpt_dir):
    state, tensors = describe(flatten({"big": torch.arange(5000, dtype=torch.float32)}))
    writer = async_ckpt.FileSystemWriter(ckpt_dir)
    run_save(state, memory_waves(state, tensors), writer, LocalComm(), Planner(), block_size=4096)
    chunk = _chunk(ckpt_dir, "big")
    assert len(chunk["checksums"]) == 5  # 20000 bytes in 4096-byte blocks
    _flip_bit(ckpt_dir / chunk["file"], chunk["offset"] + 3 * 4096 + 7)
    with pytest.raises(ChecksumMismatchError, match=f"bytes from {chunk['offset'] + 3 * 4096}"):
        async_ckpt.load({"big": torch.zeros(5000)}, checkpoint_id=ckpt_dir)


def test_a_damaged_object_entry_is_a_checksum_mismatch(ckpt_dir):
    async_ckpt.save({"day": datetime.date(2020, 1, 2)}, checkpoint_id=ckpt_dir)
    entry = read_meta(ckpt_dir)["entries"]["day"]
    _flip_bit(ckpt_dir / entry["file"], entry["offset"] + entry["nbytes"] - 3)
    with pytest.raises(ChecksumMismatchError, match="'day'"):
        async_ckpt.load({"day": None}, checkpoint_id=ckpt_dir)


def test_a_truncated_data_file_is_corrupt(ckpt_dir, saved_small):
    chunk = _chunk(ckpt_dir, "w")
    os.truncate(ckpt_dir / chunk["file"], 100)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        async_ckpt.load(saved_small(), checkpoint_id=ckpt_dir)
    with pytest.raises(CorruptCheckpointError):
        async_ckpt.load(saved_small(), checkpoint_id=ckpt_dir, verify=False)


def test_a_deleted_data_file_is_corrupt(ckpt_dir, saved_small):
    chunk = _chunk(ckpt_dir, "w")
    os.unlink(ckpt_dir / chunk["file"])
    with pytest.raises(CorruptCheckpointError, match="missing"):
        async_ckpt.load(saved_small(), checkpoint_id=ckpt_dir)


def test_missing_metadata_is_an_incomplete_checkpoint(ckpt_dir, saved_small):
    os.unlink(ckpt_dir / "metadata.json")
    with pytest.raises(IncompleteCheckpointError, match="never committed"):
        async_ckpt.load(saved_small(), checkpoint_id=ckpt_dir)


def test_a_nonexistent_directory_is_not_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        async_ckpt.load({"a": 1}, checkpoint_id=tmp_path / "nothing-here")


def test_truncated_metadata_is_a_metadata_error(ckpt_dir, saved_small):
    raw = (ckpt_dir / "metadata.json").read_bytes()
    (ckpt_dir / "metadata.json").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MetadataError, match="own checksum"):
        async_ckpt.load(saved_small(), checkpoint_id=ckpt_dir)


# ---------------------------------------------------------------------------- hostile metadata


def test_the_marker_payload_would_run_code_if_unpickled(tmp_path):
    marker = tmp_path / "proof"
    pickle.loads(_evil_payload(marker))  # noqa: S301 - shows the payload is live
    assert marker.exists()


def test_pickle_bytes_as_metadata_are_refused_without_running_them(ckpt_dir, tmp_path):
    marker = tmp_path / "pwned"
    ckpt_dir.mkdir()
    (ckpt_dir / "metadata.json").write_bytes(_evil_payload(marker))
    with pytest.raises(MetadataError):
        async_ckpt.load({"a": 1}, checkpoint_id=ckpt_dir)
    assert not marker.exists()


def test_an_object_entry_with_a_code_running_pickle_is_refused(ckpt_dir, tmp_path):
    marker = tmp_path / "pwned"
    async_ckpt.save({"obj": datetime.date(2020, 1, 2), "t": torch.ones(2)}, checkpoint_id=ckpt_dir)
    reseal_object(ckpt_dir, "obj", _evil_payload(marker))  # bytes AND checksum fixed up
    with pytest.raises(UnsafeObjectError, match="builtins.exec"):
        async_ckpt.load({"obj": None, "t": torch.zeros(2)}, checkpoint_id=ckpt_dir)
    assert not marker.exists()
    with pytest.raises(UnsafeObjectError):  # verify=False does not lower the allow-list
        async_ckpt.load({"obj": None, "t": torch.zeros(2)}, checkpoint_id=ckpt_dir, verify=False)
    assert not marker.exists()


def test_a_resealed_allow_listed_payload_still_loads(ckpt_dir):
    """Control for the test above: the resealing itself leaves a loadable checkpoint."""
    async_ckpt.save({"obj": datetime.date(2020, 1, 2)}, checkpoint_id=ckpt_dir)
    reseal_object(ckpt_dir, "obj", pickle.dumps(datetime.date(1999, 12, 31), protocol=4))
    target = {"obj": None}
    async_ckpt.load(target, checkpoint_id=ckpt_dir)
    assert target["obj"] == datetime.date(1999, 12, 31)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "sub/x.data", "..", ".metadata.json"])
def test_a_data_file_name_leaving_the_checkpoint_is_refused(ckpt_dir, saved_small, name):
    outside = ckpt_dir.parent / "x"
    doc = read_meta(ckpt_dir)
    old = doc["entries"]["w"]["chunks"][0]["file"]
    outside.write_bytes((ckpt_dir / old).read_bytes())  # same bytes, so only the name is wrong
    doc["files"][name] = doc["files"].pop(old)
    for entry in doc["entries"].values():
        for chunk in entry.get("chunks", []):
            if chunk["file"] == old:
                chunk["file"] = name
    write_meta(ckpt_dir, doc)
    with pytest.raises(MetadataError, match="file"):
        async_ckpt.load(saved_small(), checkpoint_id=ckpt_dir)


def test_a_symlinked_data_file_pointing_outside_is_refused(ckpt_dir, saved_small):
    name = _chunk(ckpt_dir, "w")["file"]
    outside = ckpt_dir.parent / "elsewhere.data"
    os.replace(ckpt_dir / name, outside)  # identical bytes and checksums, reached via a link
    os.symlink(outside, ckpt_dir / name)
    with pytest.raises(CorruptCheckpointError, match="symlink|regular"):
        async_ckpt.load(saved_small(), checkpoint_id=ckpt_dir)


def test_a_symlinked_metadata_file_is_refused(ckpt_dir, saved_small):
    outside = ckpt_dir.parent / "metadata.json"
    os.replace(ckpt_dir / "metadata.json", outside)
    os.symlink(outside, ckpt_dir / "metadata.json")
    with pytest.raises(CorruptCheckpointError, match="regular"):
        async_ckpt.load(saved_small(), checkpoint_id=ckpt_dir)


def test_a_fifo_in_place_of_a_data_file_is_refused_without_hanging(ckpt_dir, saved_small):
    name = _chunk(ckpt_dir, "w")["file"]
    os.unlink(ckpt_dir / name)
    os.mkfifo(ckpt_dir / name)
    with pytest.raises(CorruptCheckpointError, match="regular file"):
        async_ckpt.load(saved_small(), checkpoint_id=ckpt_dir)


@pytest.mark.parametrize("version", [0, 4, "1", None])
def test_a_wrong_format_version_is_refused(ckpt_dir, saved_small, version):
    doc = read_meta(ckpt_dir)
    doc["version"] = version
    write_meta(ckpt_dir, doc)
    with pytest.raises(MetadataError, match="version"):
        async_ckpt.load(saved_small(), checkpoint_id=ckpt_dir)


# ---------------------------------------------------------------------------- absurd sizes


def _declare_object_size(path, key, nbytes):
    """Metadata consistent in itself that claims a huge object entry."""
    doc = read_meta(path)
    entry = doc["entries"][key]
    doc["files"][entry["file"]] = {"size": nbytes}
    doc["checksum"]["block_size"] = nbytes  # one checksum for the whole range
    entry.update(offset=0, nbytes=nbytes, checksums=[0])
    for other in doc["entries"].values():
        for chunk in other.get("chunks", []):
            chunk["checksums"] = [crc((path / chunk["file"]).read_bytes())]
    write_meta(path, doc)


def test_a_huge_declared_object_fails_before_allocating(ckpt_dir):
    async_ckpt.save({"obj": datetime.date(2020, 1, 2)}, checkpoint_id=ckpt_dir)
    _declare_object_size(ckpt_dir, "obj", 2**44)  # 16 TiB
    with pytest.raises(CorruptCheckpointError, match="holds"):
        async_ckpt.load({"obj": None}, checkpoint_id=ckpt_dir)


def test_a_huge_declared_tensor_fails_before_allocating(ckpt_dir):
    async_ckpt.save({"t": torch.ones(4)}, checkpoint_id=ckpt_dir)
    doc = read_meta(ckpt_dir)
    entry = doc["entries"]["t"]
    chunk = entry["chunks"][0]
    n = 2**42
    doc["files"][chunk["file"]] = {"size": 4 * n}
    doc["checksum"]["block_size"] = 4 * n
    entry["shape"] = [n]
    chunk.update(sizes=[n], nbytes=4 * n)
    write_meta(ckpt_dir, doc)
    with pytest.raises(CorruptCheckpointError, match="holds"):
        async_ckpt.load({"t": None}, checkpoint_id=ckpt_dir)  # None: the load would allocate


@pytest.mark.parametrize(
    "field, value",
    [("offset", 2**62), ("offset", 10**30), ("nbytes", 2**62), ("offset", -5)],
)
def test_absurd_offsets_are_metadata_errors(ckpt_dir, saved_small, field, value):
    doc = read_meta(ckpt_dir)
    doc["entries"]["w"]["chunks"][0][field] = value
    write_meta(ckpt_dir, doc)
    with pytest.raises(MetadataError):
        async_ckpt.load(saved_small(), checkpoint_id=ckpt_dir)


def test_an_absurd_list_index_is_refused_not_allocated(ckpt_dir):
    class Holder:
        """A Stateful object: the checkpoint may add entries inside its state dict."""

        def __init__(self) -> None:
            self.loaded = None

        def state_dict(self):
            return {"items": [1, 2]}

        def load_state_dict(self, state):
            self.loaded = state

    async_ckpt.save({"h": Holder()}, checkpoint_id=ckpt_dir)
    doc = read_meta(ckpt_dir)
    huge = 10**12
    doc["entries"][f"h.items.{huge}"] = {
        "kind": "value",
        "path": ["h", "items", huge],
        "value": {"type": "int", "value": 3},
    }
    write_meta(ckpt_dir, doc)
    holder = Holder()
    with pytest.raises(StateDictError, match="index"):
        async_ckpt.load({"h": holder}, checkpoint_id=ckpt_dir)
    assert holder.loaded is None


def test_an_untampered_stateful_checkpoint_loads(ckpt_dir):
    """Control for the test above."""
    store = {}

    class Holder:
        def state_dict(self):
            return {"items": [1, 2]}

        def load_state_dict(self, state):
            store.update(state)

    async_ckpt.save({"h": Holder()}, checkpoint_id=ckpt_dir)
    async_ckpt.load({"h": Holder()}, checkpoint_id=ckpt_dir)
    assert store == {"items": [1, 2]}
