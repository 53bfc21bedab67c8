"""Staging: snapshot training state into reused shared-memory arenas."""

from .arena import Arena
from .options import StagerOptions, parse_size
from .snapshot import Snapshot, Wave
from .stager import Stager

__all__ = ["Arena", "Snapshot", "Stager", "StagerOptions", "Wave", "parse_size"]
