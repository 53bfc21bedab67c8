"""Write the golden files of tests/test_format.py. Run only for a deliberate format change.

    .venv/bin/python tests/golden/make_golden.py

The files pin the on-disk format: a change that alters them must bump
FORMAT_VERSION (docs/FORMAT.md, "Versioning"), and the v1 checkpoint directory
must then be kept, not regenerated, so that old checkpoints stay loadable.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import async_ckpt

HERE = Path(__file__).parent
SAVE_ID = "00000000c0ffee00"
TINY_METADATA = HERE / "tiny_metadata.json"
V1_CHECKPOINT = HERE / "v1_checkpoint"
V2_CHECKPOINT = HERE / "v2_checkpoint"
V3_CHECKPOINT = HERE / "v3_checkpoint"
V3_BASE_ID = "00000000ba5e0000"


def tiny_state() -> dict:
    """The state whose metadata bytes are pinned: a tensor, an int, a str, a nested list."""
    return {
        "weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "step": 42,
        "name": "tiny",
        "nested": [1, [2.5, "x"], None],
    }


def v1_state() -> dict:
    """A state with one leaf of every kind, saved once per format version."""
    return {
        "model": {
            "weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4,
            "bias": torch.tensor([-1.5, 0.0, 2.25], dtype=torch.bfloat16),
            "mask": torch.tensor([True, False, True]),
            "steps": torch.tensor(7, dtype=torch.int64),
        },
        "optim": {"state": {0: {"exp_avg": torch.full((2, 2), 0.125, dtype=torch.float64)}}},
        "array": np.arange(5, dtype=np.int32),
        "epoch": 3,
        "loss": float("nan"),
        "best": float("inf"),
        "tag": "golden ✓",
        "blob": b"\x00\xffgolden",
        "nothing": None,
        "shape": (2, [3, 4]),
        "day": datetime.date(2024, 2, 29),
    }


def save_golden(state: dict, path: Path, save_id: str = SAVE_ID, **kwargs: object) -> None:
    """Save ``state`` to ``path`` with a fixed save id."""
    with mock.patch("async_ckpt.pipeline.save.new_save_id", return_value=save_id):
        async_ckpt.save(state, checkpoint_id=path, **kwargs)


def save_incremental_golden(path: Path) -> None:
    """Version 3: an incremental save of ``v1_state`` whose base differed in model.weight
    alone, so that it holds a data file named by the base's save id (shared; in git a
    copy, where the writer made a hard link)."""
    with tempfile.TemporaryDirectory() as tmp:
        base_state = v1_state()
        base_state["model"]["weight"] = torch.zeros(3, 4)
        save_golden(base_state, Path(tmp) / "base", V3_BASE_ID, incremental=True)
        save_golden(v1_state(), path, base=Path(tmp) / "base")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        save_golden(tiny_state(), Path(tmp) / "tiny")
        shutil.copyfile(Path(tmp) / "tiny" / "metadata.json", TINY_METADATA)
    # One checkpoint per format version, written once by the version that made it; the
    # current version's is written when missing. Old ones are never regenerated.
    for path in (V1_CHECKPOINT, V2_CHECKPOINT, V3_CHECKPOINT):
        if path.exists():
            print(f"kept {path} (golden checkpoints are never regenerated)")
        elif path == V2_CHECKPOINT:
            save_golden(v1_state(), path)
            print(f"wrote {path}")
        elif path == V3_CHECKPOINT:
            save_incremental_golden(path)
            print(f"wrote {path}")
    print(f"wrote {TINY_METADATA}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
