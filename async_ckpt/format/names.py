"""The names a checkpoint's files have on storage (see docs/FORMAT.md)."""

from __future__ import annotations

import re

METADATA_FILE = "metadata.json"
"""The commit record; a checkpoint exists for readers once this file does."""

_SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


def is_safe_file_name(name: object) -> bool:
    """A data-file name is one plain path component: no separators, no ``..``."""
    return isinstance(name, str) and bool(_SAFE_FILE_NAME.fullmatch(name)) and ".." not in name
