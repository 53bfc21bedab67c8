"""Names of tensor dtypes as they appear in metadata, and their byte sizes."""

from __future__ import annotations

import torch

from ..errors import MetadataError, StateDictError


def _all_dtypes() -> dict[str, torch.dtype]:
    found: dict[str, torch.dtype] = {}
    for name in dir(torch):
        value = getattr(torch, name, None)
        # Quantized dtypes need a scale and zero point besides their bytes: not stored.
        if isinstance(value, torch.dtype) and not str(value).startswith("torch.q"):
            found[str(value).removeprefix("torch.")] = value
    return found


_BY_NAME = _all_dtypes()


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical metadata name of ``dtype`` (``torch.float32`` -> ``"float32"``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _BY_NAME:
        raise StateDictError(f"tensor dtype {dtype} is not supported by this torch build")
    return name


def dtype_from_name(name: object) -> torch.dtype:
    """The torch dtype a metadata name stands for; unknown names are metadata errors."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise MetadataError(
            f"unknown tensor dtype {name!r} in metadata; the checkpoint was written by a "
            "torch build with dtypes this one lacks, or the metadata is damaged"
        )
    return _BY_NAME[name]


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return dtype.itemsize  # no tensor allocation: this runs for every item of every save
