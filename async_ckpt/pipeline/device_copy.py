"""A load's copies into the caller's tensors, host-to-device ones asynchronous.

For a CUDA target the reader threads read (and verify) into a page-locked
buffer, then queue the host-to-device copy on a side stream of their own and go
on to the next read while the copy runs. PyTorch's pinned-memory allocator does
not hand a freed buffer out again before the copies queued from it are done,
so a buffer may be dropped right after its copy is queued. Each side stream
first waits for what the caller's stream had queued when the load started (the
tensors may still be in use there), and :meth:`DeviceCopies.finish` waits for
every side stream: a load returns with every byte in place.

CPU targets are copied as before. Without CUDA none of this runs.
"""

from __future__ import annotations

import itertools
import operator
import threading
from typing import Any

import torch

_is_cuda = operator.attrgetter("is_cuda")


class DeviceCopies:
    """The copies of one load (see the module docstring)."""

    def __init__(self, targets: list[torch.Tensor]) -> None:
        # C-level filter: a load of 100k CPU tensors pays no Python loop here
        devices = {t.device for t in itertools.compress(targets, map(_is_cuda, targets))}
        # the caller's streams, captured on the caller's thread
        self._after = {d: torch.cuda.current_stream(d) for d in devices}
        self._streams: dict[tuple[int, Any], Any] = {}
        self._lock = threading.Lock()
        self._pinned_failed = False

    def buffer(self, nbytes: int, dest: torch.Tensor) -> torch.Tensor:
        """A host buffer to read ``dest``'s bytes into: page-locked for a CUDA ``dest``
        (pageable if page-locking fails), else ordinary memory."""
        if dest.device.type == "cuda" and not self._pinned_failed:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:  # no page-locked memory left (memlock limits): slower copies
                self._pinned_failed = True
        return torch.empty(nbytes, dtype=torch.uint8)

    def _stream(self, device: torch.device) -> Any:
        key = (threading.get_ident(), device)
        with self._lock:
            stream = self._streams.get(key)
            if stream is None:
                stream = torch.cuda.Stream(device)
                stream.wait_stream(self._after[device])
                self._streams[key] = stream
        return stream

    def copy(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        """``dest.copy_(src)``; for a CUDA ``dest``, queued on this thread's side stream."""
        if dest.device.type != "cuda":
            dest.copy_(src)
            return
        with torch.cuda.stream(self._stream(dest.device)):
            dest.copy_(src, non_blocking=src.is_pinned())

    def finish(self) -> None:
        """Wait for every queued host-to-device copy."""
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.synchronize()
