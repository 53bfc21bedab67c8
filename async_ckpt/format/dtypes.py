"""Names of tensor dtypes as they appear in metadata, and their byte sizes."""

from __future__ import annotations

import math

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


def _real_part(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


def is_lossless_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether every value of ``src`` converts to ``dst`` exactly (and finite stays finite).

    float32 -> float64, int32 -> int64, int16 -> float32, bfloat16 -> float32 and
    complex64 -> complex128 are lossless; float -> int, complex -> real, float32 ->
    bfloat16/float16, int64 -> float64 and float16 <-> bfloat16 are not.
    """
    if src == dst or src == torch.bool:
        return True
    if dst == torch.bool or (src.is_complex and not dst.is_complex):
        return False
    try:
        if src.is_floating_point or src.is_complex:
            if not (dst.is_floating_point or dst.is_complex):
                return False
            s, d = torch.finfo(_real_part(src)), torch.finfo(_real_part(dst))
            return d.bits >= s.bits and d.eps <= s.eps and d.max >= s.max and d.tiny <= s.tiny
        s_int = torch.iinfo(src)
        if dst.is_floating_point or dst.is_complex:
            d_float = torch.finfo(_real_part(dst))
            # exact while the integer's magnitude fits the mantissa (plus its hidden bit)
            mantissa_bits = round(-math.log2(d_float.eps)) + 1
            return max(abs(s_int.min), s_int.max).bit_length() <= mantissa_bits
        d_int = torch.iinfo(dst)
        return d_int.min <= s_int.min and d_int.max >= s_int.max
    except TypeError:  # a dtype torch has no finfo/iinfo for: only identity is known safe
        return False
