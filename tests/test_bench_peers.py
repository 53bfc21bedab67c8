"""The third-party peers of benchmarks/peers_ext.py round-trip a tiny state bit-exactly.

Each installed peer (the `peers` extra) saves through its benchmark Method, the
state is mutated as soon as the save is staged (as the runner does), and the
load must return the state as it was when save() was called. Peers that are not
installed are skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:  # benchmarks/ is not installed; NVRx's spawned worker imports it too
    sys.path.insert(0, REPO)

from benchmarks import peers_ext  # noqa: E402
from benchmarks.base import BenchContext  # noqa: E402
from benchmarks.state import (  # noqa: E402
    assert_state_equal,
    build_state,
    clone_state,
    mutate,
    tensor_bytes,
)

MODULES = {
    "nvrx_async": "nvidia_resiliency_ext.checkpointing.async_ckpt.filesystem_async",
    "torchsnapshot_async": "torchsnapshot",
    "torchsnapshot_async_fsync": "torchsnapshot",
}


@pytest.fixture
def process_group() -> Iterator[None]:
    """The peers init a 1-rank gloo group; destroy it if this test made it."""
    had = dist.is_initialized()
    yield
    if not had and dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.load, no_dist
@pytest.mark.parametrize("name", list(MODULES))
def test_round_trip(name: str, tmp_path: Path, process_group: None) -> None:
    pytest.importorskip(MODULES[name])
    root = tmp_path / "size"
    root.mkdir()
    state = build_state(256 << 10, seed=1)
    ctx = BenchContext(root=root, state=state, nbytes=tensor_bytes(state))
    method = peers_ext.PEERS[name]()
    assert method.skip_reason() is None  # type: ignore[attr-defined]
    method.setup(ctx)
    try:
        for r in range(2):  # the second save reuses what setup() and the first one started
            mutate(state)
            expected = clone_state(state)
            path = root / f"ckpt{r}"
            pending = method.save(state, path)
            pending.wait_staged()
            mutate(state)  # the next step races the write
            pending.wait_committed()
            assert path.is_dir()
            assert_state_equal(method.load(ctx, path), expected)
            method.run_info()
        assert method.info()["version"]
    finally:
        method.teardown()


def test_registry_split() -> None:
    available = peers_ext.available_peers()
    unavailable = peers_ext.unavailable_peers()
    assert set(available) | set(unavailable) == set(peers_ext.PEERS)
    assert not set(available) & set(unavailable)
    for name, why in unavailable.items():
        assert "pip install" in why, (name, why)


def test_missing_package_is_a_reason() -> None:
    why = peers_ext._missing("no_such_module_for_peers_ext", "no-such-dist")
    assert why is not None and why.startswith("no-such-dist not installed")
