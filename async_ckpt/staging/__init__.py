"""Staging: snapshot training state into reused shared-memory arenas."""

from .arena import Arena
from .stager import Snapshot, Stager, StagerOptions

__all__ = ["Arena", "Snapshot", "Stager", "StagerOptions"]
