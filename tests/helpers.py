"""Test helpers: dtypes to cover, exact tensor comparison, metadata surgery."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import torch

from async_ckpt.format.checksum import block_checksums
from async_ckpt.format.seal import seal_metadata

GOLDEN = Path(__file__).parent / "golden"

# Names of dtypes the round-trip tests cover, where this torch build has them.
_DTYPE_NAMES = [
    "float32",
    "float16",
    "float64",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "bool",
    "complex64",
    "complex128",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
]
DTYPES = [getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are random (every bit pattern, NaNs included)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The exact bytes of ``t``'s elements in row-major order (bit-exact comparison)."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensor(actual: Any, expected: torch.Tensor) -> None:
    """Same type, dtype, shape and bytes (NaN payloads and float8 included)."""
    assert isinstance(actual, torch.Tensor), type(actual)
    assert actual.dtype == expected.dtype
    assert tuple(actual.shape) == tuple(expected.shape)
    assert tensor_bytes(actual) == tensor_bytes(expected)


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata.json as a dict."""
    return json.loads((Path(path) / "metadata.json").read_bytes())


def write_meta(path: Path, doc: dict[str, Any], *, seal: bool = True) -> None:
    """Replace the checkpoint's metadata.json (tests that damage metadata).

    The result is resealed (its own checksum made to match), as a deliberate
    forger would, so that the decoder's other checks are what the test meets.
    """
    write_meta_bytes(path, json.dumps(doc, separators=(",", ":")).encode(), seal=seal)


def write_meta_bytes(path: Path, data: bytes, *, seal: bool = True) -> None:
    """Replace metadata.json with ``data``, resealed when it has a checksum field to seal."""
    if seal:
        try:
            data = seal_metadata(data)
        except ValueError:
            pass  # no checksum field (version 1, or the test removed it)
    (Path(path) / "metadata.json").write_bytes(data)


def data_files(path: Path) -> list[str]:
    """Names of the ``*.data`` files in a checkpoint directory, sorted."""
    return sorted(p.name for p in Path(path).iterdir() if p.name.endswith(".data"))


def reseal_object(path: Path, key: str, payload: bytes) -> None:
    """Make object entry ``key`` hold ``payload``, with sizes and checksums fixed up.

    The payload gets a data file of its own, so only the allow-list stands
    between a crafted payload and the unpickler.
    """
    doc = read_meta(path)
    entry = doc["entries"][key]
    (Path(path) / entry["file"]).write_bytes(payload)
    doc["files"][entry["file"]] = {"size": len(payload)}
    entry["offset"] = 0
    entry["nbytes"] = len(payload)
    block = doc["checksum"]["block_size"]
    entry["checksums"] = block_checksums(memoryview(payload), block)
    write_meta(path, doc)


def crc(data: bytes) -> int:
    """CRC-32C of ``data``."""
    return crc32c.crc32c(data)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds, for states another process changes (a worker
    exiting or stopping, a file appearing) that no event in this process reports.

    ``timeout`` only bounds a wait for something that never happens: it fails the test
    with ``what`` then, however loaded the machine.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.01)


def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a child interpreter (one that exits for real); its stdout, stripped.

    Fails the test when the child fails or prints a traceback (Python reports an
    error in an exit hook or a thread on stderr and still exits 0).
    """
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=600,  # bounds a broken test only: the suite must pass on a busy machine
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout.strip()


def exit_code_of_a_forked_child(timeout: float) -> int | None:
    """Fork a child that does nothing and exits, as a DataLoader worker does, and wait
    for it; its exit code, or None if it had not ended within ``timeout`` (it is
    killed then: a child stuck in the exit hooks must not hold the test run)."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=_do_nothing, daemon=True)
    child.start()
    try:
        child.join(timeout)
        return child.exitcode
    finally:
        child.kill()


def _do_nothing() -> None:
    pass
