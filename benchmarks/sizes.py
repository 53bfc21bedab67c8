"""Sizes on the benchmarks' command lines: ``512MiB``, ``1GiB``, ``4096``."""

from __future__ import annotations

import argparse

from async_ckpt import CheckpointError
from async_ckpt.staging import parse_size as library_parse_size


def parse_size(text: str) -> int:
    """'512MiB', '1GiB', '1.5G', '100MB', '4096' -> bytes (K/M/G are binary)."""
    try:
        return library_parse_size(text)
    except CheckpointError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 256MiB or 1GiB") from None
