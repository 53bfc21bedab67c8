"""The metadata file's own checksum: a damaged metadata file is refused, not misread.

CRC-32C of the file's bytes with the 8 hex digits of ``checksum.metadata``
read as zeros. See docs/FORMAT.md.
"""

from __future__ import annotations

import re

import crc32c

from ..errors import MetadataChecksumError
from .names import METADATA_FILE

# The metadata's own checksum: CRC-32C of the file's bytes with these 8 hex digits
# zeroed. The encoder writes "checksum" as the first top-level key and "metadata"
# as its last field, so the first occurrence of the pattern is this field; the
# decoder also checks that the parsed field holds the digits it verified.
_FIELD = re.compile(rb'"metadata":"([0-9a-f]{8})"')
PLACEHOLDER = b"0" * 8


def _self_checksum(data: bytes, start: int) -> int:
    """CRC-32C of ``data`` with the 8 digits at ``start`` read as zeros."""
    crc = crc32c.crc32c(data[:start])
    crc = crc32c.crc32c(PLACEHOLDER, crc)
    return crc32c.crc32c(data[start + 8 :], crc)


def seal_metadata(data: bytes) -> bytes:
    """``data`` with its ``checksum.metadata`` field set to the checksum of the result."""
    found = _FIELD.search(data)
    if found is None:
        raise ValueError("the metadata has no checksum.metadata field to seal")
    start = found.start(1)
    return data[:start] + f"{_self_checksum(data, start):08x}".encode() + data[start + 8 :]


def verify_self_checksum(data: bytes) -> str | None:
    """Check the metadata's own checksum; returns its digits, None if it has none.

    Raises :class:`MetadataChecksumError` when the bytes do not match it.
    """
    found = _FIELD.search(data)
    if found is None:
        return None
    if _self_checksum(data, found.start(1)) != int(found.group(1), 16):
        raise MetadataChecksumError(
            f"the checkpoint's {METADATA_FILE} does not match its own checksum: the file is "
            "damaged (a changed byte could alter loaded values). Load an earlier checkpoint."
        )
    return found.group(1).decode()
