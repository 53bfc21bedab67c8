"""The one progress bar of long reads and writes: bytes, on stderr, gone when done."""

from __future__ import annotations

import sys

from tqdm import tqdm


def byte_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar counting ``total`` bytes; draws nothing unless ``enabled``.

    ``update`` may be called from several threads (tqdm serialises it).
    """
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        disable=not enabled,
        leave=False,
    )
