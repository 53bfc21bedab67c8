"""The async-ckpt command line on good, missing and broken checkpoints: output and exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import read_meta, tensor_bytes, write_meta

import async_ckpt
from async_ckpt.cli import main
from async_ckpt.manager import CheckpointManager
from async_ckpt.materialize import materialize
from async_ckpt.state.flatten import flatten


def _state() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optim = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    optim.step()
    return {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "step": 7,
        "name": "run-1",
        "pair": (1, torch.arange(3)),
        "table": np.arange(6, dtype=np.int32).reshape(2, 3),
        "tags": {"a", "b"},
        "big": torch.randn(300, 100),
    }


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    state = _state()
    path = tmp_path / "ckpt"
    async_ckpt.save(state, checkpoint_id=path)
    return path, state


def run(capsys: pytest.CaptureFixture, *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _damage(path: Path, entry: str) -> str:
    """Flip a byte inside ``entry``'s stored bytes; returns its data file's name."""
    chunk = read_meta(path)["entries"][entry]["chunks"][0]
    with open(path / chunk["file"], "r+b") as f:
        f.seek(chunk["offset"] + 5)
        byte = f.read(1)
        f.seek(chunk["offset"] + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    return chunk["file"]


# ---------------------------------------------------------------------------------- inspect


def test_inspect_tree(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "inspect", ckpt[0])
    assert code == 0
    lines = out.splitlines()
    big = next(line for line in lines if line.startswith("big "))
    assert big.split()[:5] == ["big", "tensor", "float32", "[300,", "100]"]
    assert "117.2 KiB" in big and "1 chunk" in big
    assert any(line.strip().startswith("exp_avg ") for line in lines)  # nested keys indented
    assert any(line.startswith("model") and "(dict)" in line for line in lines)
    assert any(line.startswith("table") and "ndarray" in line and "int32" in line for line in lines)
    assert any(line.startswith("tags") and "object" in line for line in lines)
    assert any(line.startswith("step") and "value" in line and "7" in line for line in lines)
    assert lines[-1].startswith("totals: ")
    assert "tensors" in lines[-1] and "data file" in lines[-1]


def test_inspect_json(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "inspect", "--json", ckpt[0])
    assert code == 0
    doc = json.loads(out)
    assert doc["entries"]["big"] == {
        "kind": "tensor",
        "dtype": "float32",
        "shape": [300, 100],
        "bytes": 120000,
        "chunks": 1,
    }
    assert doc["entries"]["step"] == {"kind": "value", "type": "int"}
    assert doc["totals"]["tensor_bytes"] == sum(
        e["bytes"] for e in doc["entries"].values() if e["kind"] in ("tensor", "ndarray")
    )


def test_inspect_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "inspect", tmp_path / "nope")
    assert code == 2
    assert "no checkpoint at" in err and "nope" in err


def test_inspect_incomplete(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "abc-r0-0.data").write_bytes(b"x")
    code, _, err = run(capsys, "inspect", tmp_path / "half")
    assert code == 1
    assert "incomplete" in err


def test_inspect_bad_metadata(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture) -> None:
    (ckpt[0] / "metadata.json").write_bytes(b'{"format": "async_ckpt", "vers')
    code, _, err = run(capsys, "inspect", ckpt[0])
    assert code == 1
    assert "metadata" in err


def test_inspect_manager_root_hints_ls(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with CheckpointManager(tmp_path, executor="thread") as manager:
        manager.save(5, {"x": torch.ones(2)})
    code, _, err = run(capsys, "inspect", tmp_path)
    assert code == 2
    assert "manager root" in err and "async-ckpt ls" in err


# ----------------------------------------------------------------------------------- verify


def test_verify_good(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "verify", ckpt[0])
    assert code == 0
    assert out.startswith("ok: ") and "verified" in out
    assert "verify" in err  # the progress bar


def test_verify_flipped_byte(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture) -> None:
    name = _damage(ckpt[0], "big")
    code, _, err = run(capsys, "verify", "--quiet", ckpt[0])
    assert code == 1
    assert "checksum mismatch" in err and "'big'" in err and name in err
    assert "1 problem" in err


def test_verify_reports_every_problem(
    ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture
) -> None:
    path = ckpt[0]
    _damage(path, "big")
    doc = read_meta(path)
    obj = doc["entries"]["tags"]
    other = {c["file"] for c in doc["entries"]["big"]["chunks"]}
    assert obj["file"] not in other
    (path / obj["file"]).unlink()
    code, _, err = run(capsys, "verify", "-q", path)
    assert code == 1
    assert "'big'" in err
    assert obj["file"] in err and "missing" in err and "(holds " in err
    assert "2 problem" in err


def test_verify_truncated_file(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture) -> None:
    chunk = read_meta(ckpt[0])["entries"]["big"]["chunks"][0]
    data = ckpt[0] / chunk["file"]
    data.write_bytes(data.read_bytes()[: chunk["offset"] + 100])
    code, _, err = run(capsys, "verify", "-q", ckpt[0])
    assert code == 1
    assert chunk["file"] in err and "truncated" in err


def test_verify_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "verify", tmp_path / "nope")
    assert code == 2 and "no checkpoint" in err


def test_verify_tampered_metadata(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture) -> None:
    doc = read_meta(ckpt[0])
    doc["entries"]["big"]["chunks"][0]["file"] = "../../etc/passwd"
    write_meta(ckpt[0], doc)
    code, _, err = run(capsys, "verify", ckpt[0])
    assert code == 1 and "not a plain file name" in err


# --------------------------------------------------------------------------------------- ls


def test_ls(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with CheckpointManager(tmp_path, executor="thread", keep_last=None) as manager:
        for step in (10, 20):
            manager.save(step, {"x": torch.ones(1000)})
    (tmp_path / "step-00000030").mkdir()
    (tmp_path / "step-00000030" / "abc-r0-0.data").write_bytes(b"partial")
    code, out, _ = run(capsys, "ls", tmp_path)
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["step", "status", "size", "modified"]
    assert [r[:2] for r in rows[1:4]] == [
        ["step-00000010", "committed"],
        ["step-00000020", "committed"],
        ["step-00000030", "incomplete"],
    ]
    assert rows[3][2:4] == ["7", "B"]
    assert "2 committed, 1 incomplete" in out and "latest committed: step 20" in out


def test_ls_empty_and_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "ls", tmp_path)
    assert code == 0 and "no checkpoints under" in out
    code, _, err = run(capsys, "ls", tmp_path / "nope")
    assert code == 2 and "no checkpoint root" in err


# ---------------------------------------------------------------------------------- convert


def _assert_same(actual: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected)
        for key in expected:
            _assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_same(a, e)
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and tensor_bytes(actual) == tensor_bytes(expected)
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and np.array_equal(actual, expected)
    else:
        assert actual == expected


def test_materialize_rebuilds_nested_state(ckpt: tuple[Path, Any]) -> None:
    _assert_same(materialize(ckpt[0]), ckpt[1])


def test_convert_to_torch(
    ckpt: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out_file = tmp_path / "out.pt"
    code, out, _ = run(capsys, "convert", ckpt[0], out_file, "--to", "torch")
    assert code == 0 and "wrote" in out
    _assert_same(torch.load(out_file, weights_only=False), ckpt[1])
    code, _, err = run(capsys, "convert", ckpt[0], out_file, "--to", "torch")
    assert code == 2 and "--force" in err
    code, _, _ = run(capsys, "convert", ckpt[0], out_file, "--to", "torch", "--force")
    assert code == 0


def test_convert_to_safetensors(
    ckpt: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from safetensors.torch import load_file

    out_file = tmp_path / "model.safetensors"
    code, out, _ = run(capsys, "convert", ckpt[0], out_file, "--to", "safetensors")
    assert code == 0
    loaded = load_file(out_file)
    flat = flatten(ckpt[1]).leaves
    tensors = {k: v for k, v in flat.items() if isinstance(v, (torch.Tensor, np.ndarray))}
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        expected = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        assert tensor_bytes(loaded[key]) == tensor_bytes(expected), key
    others = len(flat) - len(tensors)
    assert f"{len(tensors)} tensors, {others} other leaves" in out
    assert f"left out {others} non-tensor leaves" in out


def test_convert_broken_checkpoint(
    ckpt: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _damage(ckpt[0], "big")
    code, _, err = run(capsys, "convert", ckpt[0], tmp_path / "o.pt", "--to", "torch")
    assert code == 1 and "checksum mismatch" in err
    assert not (tmp_path / "o.pt").exists()


def test_convert_from_dcp(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    state = _state()
    del state["tags"], state["table"]  # DCP keeps tensors and plain values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=tmp_path / "dcp", no_dist=True)
    out_id = tmp_path / "converted"
    code, out, _ = run(capsys, "convert", tmp_path / "dcp", out_id, "--from", "dcp")
    assert code == 0 and "saved" in out
    restored = materialize(out_id)
    # DCP turns the optimizer's integer state keys into strings
    restored["optim"]["state"] = {int(k): v for k, v in restored["optim"]["state"].items()}
    _assert_same(restored, state)
    code, _, err = run(capsys, "convert", tmp_path / "dcp", out_id, "--from", "dcp")
    assert code == 2 and "already exists" in err


def test_convert_from_missing_dcp(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "convert", tmp_path, tmp_path / "out", "--from", "dcp")
    assert code == 2 and "no .metadata" in err


def test_convert_from_broken_dcp(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"not a pickle")
    code, _, err = run(capsys, "convert", tmp_path / "dcp", tmp_path / "out", "--from", "dcp")
    assert code == 1 and "cannot read the DCP checkpoint" in err


# ------------------------------------------------------------------------------------ usage


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["inspect"], ["convert", "a", "b"], ["convert", "a", "b", "--to", "onnx"]],
)
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2 and "usage:" in err


def test_help(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "Exit status" in out


def test_unknown_scheme(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "inspect", "nosuchscheme://bucket/x")
    assert code == 2 and "Cannot detect" in err


def test_unexpected_error_has_no_traceback(
    ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(reader: Any) -> None:
        raise RuntimeError("storage library exploded")

    monkeypatch.setattr("async_ckpt.cli.checkpoint_metadata", boom)
    code, _, err = run(capsys, "inspect", ckpt[0])
    assert code == 1 and "RuntimeError: storage library exploded" in err and "--traceback" in err
    with pytest.raises(RuntimeError):
        main(["--traceback", "inspect", str(ckpt[0])])


def test_each_command_decodes_the_metadata_once(
    ckpt: tuple[Path, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The CLI imports its tools lazily: import them now, so that their names get patched too.
    import async_ckpt.tools.convert
    import async_ckpt.tools.verify  # noqa: F401
    from async_ckpt.format import decode

    original, decoded = decode.decode_metadata, []

    def counting(data: bytes) -> Any:
        decoded.append(len(data))
        return original(data)

    # every module that imported the name, wherever the command's decodes happen
    for name, module in list(sys.modules.items()):
        if name.startswith("async_ckpt") and getattr(module, "decode_metadata", None) is original:
            monkeypatch.setattr(module, "decode_metadata", counting)
    path = ckpt[0]
    for argv in (
        ["inspect", path],
        ["inspect", "--json", path],
        ["verify", "--quiet", path],
        ["convert", path, tmp_path / "out.pt", "--to", "torch"],
        ["convert", path, tmp_path / "out.safetensors", "--to", "safetensors"],
    ):
        decoded.clear()
        code, _, err = run(capsys, *argv)
        assert code == 0, err
        assert len(decoded) == 1, (argv, len(decoded))
