"""Shared fixtures: fresh checkpoint paths and a small saved checkpoint.

Helpers that tests import live in ``helpers.py`` (conftest is not imported).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

import async_ckpt

_memory_ids = itertools.count()


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    """A checkpoint path that does not exist yet."""
    return tmp_path / "ckpt"


@pytest.fixture
def saved_small(ckpt_dir: Path) -> Callable[[], dict[str, Any]]:
    """Save a small mixed state to ``ckpt_dir``; returns a function making a load target."""
    state = {
        "w": torch.arange(1000, dtype=torch.float32),
        "b": torch.arange(10, dtype=torch.int64),
        "step": 3,
    }
    async_ckpt.save(state, checkpoint_id=ckpt_dir)

    def target() -> dict[str, Any]:
        return {"w": torch.zeros(1000), "b": torch.zeros(10, dtype=torch.int64), "step": 0}

    return target


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A fresh ``memory://`` checkpoint id, removed from fsspec's memory store afterwards."""
    url = f"memory://async-ckpt-test-{os.getpid()}-{next(_memory_ids)}"
    yield url
    fs = fsspec.filesystem("memory")
    path = url.removeprefix("memory://")
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    """A directory for ``faulty_storage.StopAtWriter`` to wait in; released at teardown,
    so no save waits on it after its test."""
    path = tmp_path / "gate"
    path.mkdir()
    yield path
    (path / "release").touch()


@pytest.fixture(scope="module")
def ckpt() -> Iterator[async_ckpt.AsyncCheckpointer]:
    """One started process-executor checkpointer per test module; a test that kills its
    worker leaves the next save to start a fresh one."""
    with async_ckpt.AsyncCheckpointer(executor="process") as c:
        c.start()
        yield c
