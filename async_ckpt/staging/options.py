"""Stager options, each with an ``ASYNC_CKPT_<NAME>`` environment override."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import CheckpointError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def parse_size(text: str) -> int:
    """``"512MiB"``, ``"2G"``, ``"100MB"`` or ``"1048576"`` as bytes (K/M/G/T are binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise CheckpointError(f"cannot read {text!r} as a number or a size like '512MiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class StagerOptions:
    """Tunable staging behaviour; every field has an ``ASYNC_CKPT_<NAME>`` env override."""

    num_buffers: int = 1
    async_staging: bool = False
    copy_threads: int = 0  # 0: the machine's cores, at most 4
    pin_memory: bool = True  # for CUDA states; ignored without CUDA
    # Re-copy only tensors whose storage or ``_version`` changed since this buffer's
    # last stage. In-place writes through ``tensor.data`` do not bump ``_version``
    # and are missed: leave this off if the training loop writes that way.
    skip_unchanged: bool = False
    prefault: bool = True
    # Cap on all staging buffers together, in bytes (0: no cap, one buffer the size of
    # the state). A bigger state is staged and written in waves: each buffer holds
    # max_staging_bytes / num_buffers, and save() stalls until all but the last
    # num_buffers waves are written. Use the same value on every rank.
    max_staging_bytes: int = 0
    # Hand the state to the writer in parts of about this many bytes, so that writing
    # starts while the rest is still being copied (0: in one piece). Opt-in: on a
    # 2-core machine the writer competes with the copy, and the measured effect on
    # the commit ranged from 14% sooner to 9% later (docs/performance.md).
    wave_bytes: int = 0

    @classmethod
    def from_env(cls, **overrides: object) -> StagerOptions:
        opts = cls(**overrides)  # type: ignore[arg-type]
        for name, default in list(vars(opts).items()):
            raw = os.environ.get(f"ASYNC_CKPT_{name.upper()}")
            if raw is not None and name not in overrides:
                if isinstance(default, bool):
                    setattr(opts, name, raw.lower() in ("1", "true", "yes"))
                else:
                    setattr(opts, name, parse_size(raw))
        return opts
