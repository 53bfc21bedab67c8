"""Block checksums of chunk bytes (CRC-32C, hardware accelerated by `crc32c`).

A chunk is checksummed in fixed-size blocks so that a reader that needs only a
byte range (resharding) can verify exactly the blocks it reads.
"""

from __future__ import annotations

import crc32c

ALGORITHM = "crc32c"
DEFAULT_BLOCK_SIZE = 8 * 1024 * 1024


def block_checksums(data: memoryview, block_size: int) -> list[int]:
    """CRC-32C of each ``block_size`` block of ``data`` (the last may be short)."""
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    n = len(data)
    if n <= block_size:  # one block (most tensors): no slicing
        return [crc32c.crc32c(data)]
    return [crc32c.crc32c(data[i : i + block_size]) for i in range(0, n, block_size)]


def block_count(nbytes: int, block_size: int) -> int:
    """How many checksums a chunk of ``nbytes`` carries."""
    return max(1, -(-nbytes // block_size))
