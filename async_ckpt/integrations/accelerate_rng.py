"""The random number generator states ``Accelerator.save_state`` keeps, as async_ckpt leaves.

Accelerate pickles, per process, Python's ``random`` state, numpy's legacy
global state, torch's CPU generator and the generators of every accelerator
device it finds (CUDA, XPU, MLU, SDAA, MUSA, HPU, Neuron). Here each becomes
leaves async_ckpt stores without pickle:

* ``python``: ``{"version": int, "state": int64 ndarray (625), "gauss_next": float | None}``
  (``random.getstate()`` is a tuple of 625 ints; as a tuple it would flatten
  to 625 keys);
* ``numpy``: ``np.random.get_state()``'s legacy tuple as it is
  (``("MT19937", uint32 ndarray, pos, has_gauss, cached_gaussian)``: a str, a
  numeric array and plain numbers, all stored natively);
* ``torch``: the uint8 tensor of ``torch.get_rng_state()``;
* ``cuda`` (and the other device names): the list ``get_rng_state_all()`` returns.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

log = logging.getLogger("async_ckpt")

# The device generators accelerate saves, each with accelerate's availability check.
DEVICES = ("cuda", "xpu", "mlu", "sdaa", "musa", "hpu", "neuron")
HOST_PARTS = ("python", "numpy", "torch")


def _device_available(name: str) -> bool:
    import accelerate.utils

    check: Callable[[], bool] | None = getattr(accelerate.utils, f"is_{name}_available", None)
    if check is None or not hasattr(torch, name):
        return False
    try:
        return bool(check())
    except Exception:  # an availability probe of an absent backend must not stop a save
        return False


def available_devices() -> list[str]:
    """The device generators present in this process (accelerate's checks)."""
    return [name for name in DEVICES if _device_available(name)]


def capture(devices: list[str] | None = None) -> dict[str, Any]:
    """This process's generator states, as leaves async_ckpt stores natively."""
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "python": {
            "version": version,
            "state": np.asarray(internal, dtype=np.int64),
            "gauss_next": gauss_next,
        },
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state(),
    }
    for name in available_devices() if devices is None else devices:
        states[name] = list(getattr(torch, name).get_rng_state_all())
    return states


def restore(states: dict[str, Any]) -> None:
    """Set the generators from what :func:`capture` returned (parts absent are left alone)."""
    if "python" in states:
        py = states["python"]
        internal = tuple(int(x) for x in np.asarray(py["state"]).tolist())
        random.setstate((int(py["version"]), internal, py["gauss_next"]))
    if "numpy" in states:
        np.random.set_state(tuple(states["numpy"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    for name in DEVICES:
        if name in states:
            getattr(torch, name).set_rng_state_all(states[name])


def template(stored: Callable[[str], bool]) -> dict[str, Any]:
    """A load target for the parts ``stored(part)`` says the checkpoint holds.

    The host parts are always present in this process; a device part only where
    this process has that device too (else it is skipped, with a log line, as
    accelerate skips generator states it cannot set).
    """
    here = available_devices()
    parts = capture([d for d in here if stored(d)])
    for name in DEVICES:
        if stored(name) and name not in here:
            log.info("the checkpoint holds %s generator states; this process has no %s", name, name)
    return {part: value for part, value in parts.items() if stored(part)}
