"""Executors: run the background part of saves in a worker process or a thread."""

from .checkpointer import AsyncCheckpointer, async_save, close_async_saves
from .future import SaveFuture, SaveStats

__all__ = ["AsyncCheckpointer", "SaveFuture", "SaveStats", "async_save", "close_async_saves"]
