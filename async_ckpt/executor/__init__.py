"""Executors: run the background part of saves in a worker process or a thread."""

from .checkpointer import AsyncCheckpointer
from .future import SaveFuture, SaveStats

__all__ = ["AsyncCheckpointer", "SaveFuture", "SaveStats"]
