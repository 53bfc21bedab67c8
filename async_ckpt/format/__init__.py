"""The on-disk format: metadata schema, checksums, object codec. Pure data, no I/O."""

from .checksum import DEFAULT_BLOCK_SIZE, block_checksums
from .metadata import (
    FORMAT_VERSION,
    METADATA_FILE,
    Chunk,
    Entry,
    KeyPath,
    Metadata,
    ObjectEntry,
    TensorEntry,
    ValueEntry,
    decode_metadata,
    encode_metadata,
    is_safe_file_name,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "Chunk",
    "Entry",
    "KeyPath",
    "Metadata",
    "ObjectEntry",
    "TensorEntry",
    "ValueEntry",
    "block_checksums",
    "decode_metadata",
    "encode_metadata",
    "is_safe_file_name",
]
