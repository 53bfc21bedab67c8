"""Staging: snapshot training state into reused shared-memory arenas."""

from .arena import Arena
from .snapshot import Snapshot, Wave
from .stager import Stager, StagerOptions

__all__ = ["Arena", "Snapshot", "Stager", "StagerOptions", "Wave"]
