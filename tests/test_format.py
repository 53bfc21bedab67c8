"""The on-disk format: golden bytes, old checkpoints, the strict metadata decoder."""

from __future__ import annotations

import copy
import datetime
import json
import math
import re

import crc32c
import numpy as np
import pytest
import torch
from helpers import GOLDEN, data_files, read_meta

import async_ckpt
from async_ckpt import MetadataError, StateDictError
from async_ckpt.format import (
    DEFAULT_BLOCK_SIZE,
    FORMAT_VERSION,
    block_checksums,
    decode_metadata,
    encode_metadata,
    is_safe_file_name,
)
from async_ckpt.format.checksum import block_count
from async_ckpt.format.dtypes import dtype_from_name, dtype_name
from async_ckpt.format.objects import decode_plain, encode_plain

SAVE_ID = "00000000c0ffee00"


def _tiny_state() -> dict:
    return {
        "weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "step": 42,
        "name": "tiny",
        "nested": [1, [2.5, "x"], None],
    }


# ---------------------------------------------------------------------------- golden files


def test_tiny_metadata_bytes_match_the_golden_file(ckpt_dir, monkeypatch):
    monkeypatch.setattr("async_ckpt.pipeline.save.new_save_id", lambda: SAVE_ID)
    async_ckpt.save(_tiny_state(), checkpoint_id=ckpt_dir)
    golden = (GOLDEN / "tiny_metadata.json").read_bytes()
    written = (ckpt_dir / "metadata.json").read_bytes()
    assert written == golden, (
        "metadata bytes changed: a format change needs a FORMAT_VERSION bump and docs/FORMAT.md "
        "update; then regenerate with tests/golden/make_golden.py"
    )
    assert data_files(ckpt_dir) == [f"{SAVE_ID}-r0-0.data"]
    raw = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    assert (ckpt_dir / f"{SAVE_ID}-r0-0.data").read_bytes() == raw


@pytest.mark.parametrize("version", [1, 2, 3])
def test_golden_checkpoints_of_every_version_load_with_exact_values(version):
    target = {
        "model": {
            "weight": torch.zeros(3, 4),
            "bias": torch.zeros(3, dtype=torch.bfloat16),
            "mask": torch.zeros(3, dtype=torch.bool),
            "steps": torch.tensor(0),
        },
        "optim": {"state": {0: {"exp_avg": torch.zeros(2, 2, dtype=torch.float64)}}},
        "array": np.zeros(5, dtype=np.int32),
        "epoch": 0,
        "loss": 0.0,
        "best": 0.0,
        "tag": "",
        "blob": b"",
        "nothing": 1,
        "shape": (0, [0, 0]),
        "day": None,
    }
    result = async_ckpt.load(target, checkpoint_id=GOLDEN / f"v{version}_checkpoint")
    assert result.missing_keys == [] and result.unexpected_keys == []
    model = target["model"]
    assert model["weight"].tolist() == [[i / 4 for i in range(r * 4, r * 4 + 4)] for r in range(3)]
    assert model["bias"].tolist() == [-1.5, 0.0, 2.25]
    assert model["mask"].tolist() == [True, False, True]
    assert model["steps"].item() == 7
    assert target["optim"]["state"][0]["exp_avg"].tolist() == [[0.125, 0.125], [0.125, 0.125]]
    assert target["array"].tolist() == [0, 1, 2, 3, 4]
    assert target["epoch"] == 3 and math.isnan(target["loss"]) and target["best"] == math.inf
    assert target["tag"] == "golden ✓" and target["blob"] == b"\x00\xffgolden"
    assert target["nothing"] is None and target["shape"] == (2, [3, 4])
    assert target["day"] == datetime.date(2024, 2, 29)


def test_golden_v3_is_an_incremental_save_sharing_its_base_files():
    meta = decode_metadata((GOLDEN / "v3_checkpoint" / "metadata.json").read_bytes())
    assert meta.version == 3
    # shared from the base (save id 00000000ba5e0000) under names of this save: in git
    # copies, where the writer made hard links
    shared = [name for name in meta.files if int(name.split("-")[-1][:-5]) >= 1_000_000]
    assert shared == [f"00000000c0ffee00-r0-{i}.data" for i in (1000000, 1000001, 1000002)]
    assert meta.incremental is not None and meta.incremental["shared_files"] == 3
    assert meta.new_bytes == meta.total_bytes - sum(meta.files[n] for n in shared)
    tensors = [e for e in meta.entries.values() if hasattr(e, "chunks")]
    assert all(len(c.digest) == 32 for e in tensors for c in e.chunks)
    [weight] = meta.entries["model.weight"].chunks  # the one tensor the base differed in
    assert weight.file not in shared


def test_golden_metadata_reencodes_to_the_same_bytes():
    for path in (
        GOLDEN / "tiny_metadata.json",
        GOLDEN / "v1_checkpoint" / "metadata.json",
        GOLDEN / "v2_checkpoint" / "metadata.json",
        GOLDEN / "v3_checkpoint" / "metadata.json",
    ):
        raw = path.read_bytes()
        assert encode_metadata(decode_metadata(raw)) == raw, path


# ---------------------------------------------------------------------------- layout, encoding


def test_data_files_are_named_after_the_save_id(ckpt_dir):
    meta = async_ckpt.save({"a": torch.ones(1000), "b": torch.ones(10)}, checkpoint_id=ckpt_dir)
    assert re.fullmatch(r"[0-9a-f]{16}", meta.save_id)
    names = data_files(ckpt_dir)
    assert names and all(re.fullmatch(rf"{meta.save_id}-r0-\d+\.data", n) for n in names)
    assert sorted(meta.files) == names
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted([*names, "metadata.json"])


def test_metadata_is_canonical_json(ckpt_dir):
    async_ckpt.save({"z": 1, "a": float("nan"), "t": torch.ones(2)}, checkpoint_id=ckpt_dir)
    raw = (ckpt_dir / "metadata.json").read_bytes()
    doc = json.loads(raw)
    assert raw.endswith(b"}\n") and b"NaN" not in raw
    assert raw == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    assert doc["format"] == "async_ckpt" and doc["version"] == FORMAT_VERSION == 2
    assert doc["entries"]["a"]["value"] == {"type": "float", "value": "nan"}


def test_encode_decode_round_trip(ckpt_dir):
    meta = async_ckpt.save(
        {"t": torch.ones(2, 3), "n": 1, "o": datetime.date(2020, 1, 1), "arr": np.ones(2)},
        checkpoint_id=ckpt_dir,
    )
    assert decode_metadata(encode_metadata(meta)) == meta
    assert decode_metadata((ckpt_dir / "metadata.json").read_bytes()) == meta


def test_crc32c_is_the_castagnoli_polynomial():
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert block_checksums(memoryview(b"123456789"), 4096) == [0xE3069283]


def test_block_checksums_cover_each_block():
    data = bytes(range(256)) * 40  # 10240 bytes: blocks of 4096, 4096, 2048
    sums = block_checksums(memoryview(data), 4096)
    assert sums == [crc32c.crc32c(data[i : i + 4096]) for i in (0, 4096, 8192)]
    assert block_count(len(data), 4096) == 3
    assert block_checksums(memoryview(b""), 4096) == [crc32c.crc32c(b"")]
    assert block_count(0, 4096) == 1
    assert DEFAULT_BLOCK_SIZE == 8 * 1024 * 1024


def test_saved_checksums_match_the_data_file_bytes(ckpt_dir):
    async_ckpt.save({"t": torch.arange(100.0)}, checkpoint_id=ckpt_dir)
    chunk = read_meta(ckpt_dir)["entries"]["t"]["chunks"][0]
    data = (ckpt_dir / chunk["file"]).read_bytes()[chunk["offset"] : chunk["offset"] + 400]
    assert chunk["checksums"] == [crc32c.crc32c(data)]


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -(2**70), 1.5, float("inf"), float("-inf"), "", "ü", b"", b"\x00"],
)
def test_plain_values_round_trip(value):
    encoded = encode_plain(value)
    assert json.loads(json.dumps(encoded)) == encoded
    decoded = decode_plain(encoded)
    assert decoded == value and type(decoded) is type(value)


@pytest.mark.parametrize(
    "entry",
    [
        {"type": "int", "value": True},
        {"type": "int", "value": "1"},
        {"type": "float", "value": "1e3"},
        {"type": "bytes", "value": "!!"},
        {"type": "set", "value": []},
        {"type": "str", "value": "x", "extra": 1},
        ["int", 1],
    ],
)
def test_malformed_plain_values_are_metadata_errors(entry):
    with pytest.raises(MetadataError):
        decode_plain(entry)


def test_dtype_names_round_trip_and_quantized_ones_are_unknown():
    for dtype in (torch.float32, torch.bfloat16, torch.bool, torch.complex128, torch.uint8):
        assert dtype_from_name(dtype_name(dtype)) is dtype
    assert dtype_name(torch.float32) == "float32"
    with pytest.raises(StateDictError):
        dtype_name(torch.qint8)
    for bad in ("qint8", "float", "torch.float32", 5, None):
        with pytest.raises(MetadataError):
            dtype_from_name(bad)


@pytest.mark.parametrize(
    "name, safe",
    [
        ("abc-r0-0.data", True),
        ("a.b_c-1", True),
        ("../x", False),
        ("/etc/passwd", False),
        ("a/b", False),
        ("..", False),
        ("a..b", False),
        (".hidden", False),
        ("", False),
        ("a\\b", False),
        ("a\x00b", False),
        ("x" * 201, False),
        (5, False),
    ],
)
def test_safe_file_names(name, safe):
    assert is_safe_file_name(name) is safe


# ---------------------------------------------------------------------------- strict decoder


@pytest.fixture(scope="module")
def valid_doc() -> dict:
    return json.loads((GOLDEN / "v1_checkpoint" / "metadata.json").read_bytes())


def _first_tensor(doc: dict) -> dict:
    return doc["entries"]["model.weight"]


def _first_object(doc: dict) -> dict:
    return doc["entries"]["day"]


def _mutations():
    """(id, function that damages a metadata dict, expected message fragment)."""

    def top(field, value):
        return lambda d: d.__setitem__(field, value)

    def drop(field):
        return lambda d: d.pop(field)

    def tensor(field, value):
        return lambda d: _first_tensor(d).__setitem__(field, value)

    def chunk(field, value):
        return lambda d: _first_tensor(d)["chunks"][0].__setitem__(field, value)

    def obj(field, value):
        return lambda d: _first_object(d).__setitem__(field, value)

    def rename_file(new):
        def f(d):
            old = _first_tensor(d)["chunks"][0]["file"]
            d["files"][new] = d["files"].pop(old)
            _first_tensor(d)["chunks"][0]["file"] = new

        return f

    return [
        ("unknown-top-field", top("compression", "zstd"), "unknown fields"),
        ("missing-entries", drop("entries"), "lacks fields"),
        ("wrong-format-name", top("format", "torch"), "not an async_ckpt"),
        ("version-4", top("version", 4), "version"),
        ("version-string", top("version", "1"), "version"),
        ("version-missing", drop("version"), "version"),
        ("bad-save-id", top("save_id", "../x"), "save_id"),
        ("world-size-0", top("world_size", 0), "world_size"),
        ("algorithm", top("checksum", {"algorithm": "md5", "block_size": 4096}), "algorithm"),
        ("tiny-block", top("checksum", {"algorithm": "crc32c", "block_size": 1}), "block_size"),
        ("files-list", top("files", []), "files"),
        ("container-kind", top("containers", {"": "set"}), "containers"),
        ("extra-list", top("extra", []), "extra"),
        ("unknown-kind", lambda d: d["entries"].__setitem__("x", {"kind": "code"}), "kind"),
        ("entry-extra-field", tensor("compressed", True), "unknown fields"),
        ("unknown-dtype", tensor("dtype", "float128"), "dtype"),
        ("path-not-key", tensor("path", ["model", "other"]), "does not spell"),
        ("path-bool", tensor("path", [True]), "neither str nor int"),
        ("shape-negative", tensor("shape", [-3, 4]), "integer"),
        ("shape-bool", tensor("shape", [True, 4]), "integer"),
        ("shape-float", tensor("shape", [3.0, 4]), "integer"),
        ("shape-huge", tensor("shape", [2**40, 2**40]), "outside|integer|cover"),
        ("too-many-dims", tensor("shape", [1] * 65), "at most"),
        ("no-chunks", tensor("chunks", []), "cover"),
        ("chunk-outside-shape", chunk("offsets", [1, 0]), "outside"),
        ("chunk-dims", chunk("sizes", [12]), "offsets"),
        ("nbytes-mismatch", chunk("nbytes", 40), "exceeds|nbytes"),
        ("offset-past-file", chunk("offset", 2**40), "exceeds"),
        ("offset-above-limit", chunk("offset", 2**63), "integer"),
        ("offset-negative", chunk("offset", -1), "integer"),
        ("checksum-count", chunk("checksums", [1, 2]), "checksums"),
        ("checksum-64bit", chunk("checksums", [2**32]), "checksums"),
        ("file-dotdot", chunk("file", "../x"), "plain file name"),
        ("file-absolute", chunk("file", "/etc/passwd"), "plain file name"),
        ("file-unlisted", chunk("file", "other.data"), "not listed"),
        ("listed-dotdot", rename_file("../x"), "outside"),
        ("listed-absolute", rename_file("/etc/passwd"), "outside"),
        ("file-size-huge", lambda d: d["files"].__setitem__("x.data", {"size": 2**63}), "integer"),
        ("object-file-dotdot", obj("file", "../../x"), "plain file name"),
        ("object-nbytes-huge", obj("nbytes", 2**40), "exceeds"),
        ("object-type-name", obj("type_name", 5), "type_name"),
        ("value-not-dict", lambda d: d["entries"]["epoch"].__setitem__("value", 3), "value"),
    ]


@pytest.mark.parametrize(
    "mutate, message", [m[1:] for m in _mutations()], ids=[m[0] for m in _mutations()]
)
def test_decoder_rejects_malformed_metadata(valid_doc, mutate, message):
    doc = copy.deepcopy(valid_doc)
    decode_metadata(json.dumps(doc).encode())  # the unmodified document is valid
    mutate(doc)
    with pytest.raises(MetadataError, match=message):
        decode_metadata(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x80\x04K\x01.",  # a pickle
        b"\xff\xfe{}",
        b"[1, 2]",
        b'{"format": "async_ckpt", "version": 1' + b"}" * 0,
        b'{"v": ' + b"9" * 5000 + b"}",  # above Python's int-digits limit
        b"[" * 100_000 + b"]" * 100_000,  # nesting beyond the recursion limit
    ],
    ids=["empty", "pickle", "utf16", "list", "truncated", "huge-int", "deep"],
)
def test_decoder_rejects_non_metadata_bytes(raw):
    with pytest.raises(MetadataError):
        decode_metadata(raw)


def test_decoder_rejects_metadata_above_the_size_limit(monkeypatch):
    monkeypatch.setattr("async_ckpt.format.decode.MAX_METADATA_BYTES", 100)
    with pytest.raises(MetadataError, match="limit"):
        decode_metadata(b" " * 101)
