"""The names a checkpoint's files have on storage (see docs/FORMAT.md)."""

from __future__ import annotations

import re

METADATA_FILE = "metadata.json"
"""The commit record; a checkpoint exists for readers once this file does."""

METADATA_TEMP_PREFIX = f".{METADATA_FILE}.tmp-"
"""Start of the name of a metadata file still being written, before the rename that
commits it (backends that commit by rename); leftovers are swept once old."""

DATA_FILE = re.compile(r"^(?P<save_id>[A-Za-z0-9]+)-r(?P<rank>\d+)-(?P<index>\d+)\.data$")
"""Names of the data files a save creates: ``<save_id>-r<rank>-<index>.data``."""

_SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


def data_file_name(save_id: str, rank: int, index: int) -> str:
    """The name of a save's data file for ``rank`` (unique per save, so saves never mix)."""
    return f"{save_id}-r{rank}-{index}.data"


def is_safe_file_name(name: object) -> bool:
    """A data-file name is one plain path component: no separators, no ``..``."""
    return isinstance(name, str) and bool(_SAFE_FILE_NAME.fullmatch(name)) and ".." not in name
