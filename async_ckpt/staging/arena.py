"""A staging arena: one shared-memory segment, mapped once, reused by every save.

The segment is an anonymous memory file (``memfd_create``), so it has one file
descriptor whatever the number of tensors, can be handed to the worker
process over a Unix socket, and leaves nothing behind in /dev/shm when either
process dies. For CUDA states it is page-locked (``cudaHostRegister``) so
device-to-host copies run asynchronously at full bandwidth.
"""

from __future__ import annotations

import mmap
import os
import tempfile

import torch

ALIGNMENT = 64  # every tensor starts on a cache line
# Tensors this big start on a page instead, so a storage writer can hand their
# bytes to the disk straight from the arena (O_DIRECT needs page-aligned memory);
# the padding costs at most 1/64 of such a tensor.
PAGE = 4096
PAGE_ALIGNED_FROM = 256 * 1024


def align(n: int) -> int:
    """``n`` rounded up to the arena alignment."""
    return -(-n // ALIGNMENT) * ALIGNMENT


def slot_start(end: int, nbytes: int) -> int:
    """Where a tensor of ``nbytes`` goes in an arena filled up to ``end``."""
    if nbytes >= PAGE_ALIGNED_FROM:
        return -(-end // PAGE) * PAGE
    return end


def _anonymous_file() -> int:
    if hasattr(os, "memfd_create"):
        return os.memfd_create("async_ckpt-arena", os.MFD_CLOEXEC)
    # Elsewhere: an unlinked file in shared memory behaves the same way.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile(dir=shm, delete=False) as f:
        fd = os.dup(f.fileno())
    os.unlink(f.name)
    return fd


class Arena:
    """A byte buffer in shared memory, viewed as a uint8 tensor (``.bytes``)."""

    def __init__(self, nbytes: int, *, fd: int | None = None, pin: bool = False) -> None:
        self.nbytes = max(nbytes, ALIGNMENT)
        self.owner = fd is None
        self.fd = _anonymous_file() if fd is None else fd
        if self.owner:
            os.ftruncate(self.fd, self.nbytes)
        self._map = mmap.mmap(self.fd, self.nbytes)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.pinned = False
        if pin:
            self._pin()

    @classmethod
    def attach(cls, fd: int, nbytes: int) -> Arena:
        """Map an arena another process created (the worker's side)."""
        return cls(nbytes, fd=fd)

    def prefault(self) -> None:
        """Touch every page now, so the first save does not pay the page faults."""
        self.bytes.zero_()

    def _pin(self) -> None:
        if not torch.cuda.is_available():
            return
        rc = torch.cuda.cudart().cudaHostRegister(self.bytes.data_ptr(), self.nbytes, 0)
        self.pinned = int(rc) == 0

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """The arena's bytes ``[offset, offset + nbytes)`` as a uint8 tensor."""
        return self.bytes[offset : offset + nbytes]

    def memoryview(self, offset: int, nbytes: int) -> memoryview:
        """The same bytes as a memoryview (for writes that release the GIL)."""
        return memoryview(self._map)[offset : offset + nbytes]

    def close(self) -> None:
        """Unmap and close; views must not be used afterwards."""
        if self._map is None:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr())
            self.pinned = False
        del self.bytes
        try:
            self._map.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes when it does
        self._map = None
        os.close(self.fd)
