"""The on-disk format: names, metadata schema and codec, checksums, object codec. No I/O."""

from .checksum import DEFAULT_BLOCK_SIZE, block_checksums
from .decode import decode_metadata
from .metadata import (
    FORMAT_VERSION,
    Chunk,
    Entry,
    KeyPath,
    Metadata,
    ObjectEntry,
    TensorEntry,
    ValueEntry,
    encode_metadata,
)
from .names import DATA_FILE, METADATA_FILE, data_file_name, is_safe_file_name

__all__ = [
    "DATA_FILE",
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
    "data_file_name",
    "decode_metadata",
    "encode_metadata",
    "is_safe_file_name",
]
