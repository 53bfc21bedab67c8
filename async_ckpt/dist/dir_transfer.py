"""Copy a checkpoint directory from one rank to another over a gloo group.

The memory tier sends each rank's newest in-memory checkpoint to a peer on
another node, and a restarted rank fetches its copy back from that peer. Both
use :func:`exchange`: every rank of the group may send one directory and
receive one, in lockstep rounds whose sends and receives are all posted
before any is waited on, so a ring of ranks that each send and receive never
deadlocks. Each file travels in chunks of at most :data:`CHUNK_BYTES`, sent
straight from the sender's file pages and received straight into the
receiver's (memory-mapped: no copy through a buffer).

What is received is written under ``<target>.partial`` and renamed to
``target`` only once every byte arrived: a rank killed mid-transfer leaves a
``.partial`` directory, which nothing reads. The bytes are not checked here;
the checkpoint's own checksums are, when it is loaded.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("async_ckpt")

CHUNK_BYTES = 64 << 20
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class Outgoing:
    """A directory to send to rank ``dst`` (of the group); ``path`` None sends a refusal
    (the directory does not exist here), so that the receiver does not wait for it."""

    dst: int
    path: str | None
    tag: int
    label: int = 0  # what the receiver expects (a step): a mismatch is refused


@dataclass(frozen=True)
class Incoming:
    """Receive from rank ``src`` into directory ``target``."""

    src: int
    target: str
    tag: int
    label: int = 0


def _manifest(path: str) -> list[tuple[str, int]]:
    """The regular files of ``path``, metadata last, with their sizes."""
    names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    names.sort(key=lambda n: n == "metadata.json")  # stable: the metadata goes last
    return [(n, os.path.getsize(os.path.join(path, n))) for n in names]


def _encoded(obj: Any) -> torch.Tensor:
    data = json.dumps(obj).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0)


def _pieces(manifest: list[tuple[str, int]], chunk_bytes: int) -> list[tuple[int, int, int]]:
    """``(file index, offset, length)`` of each chunk: every file cut at ``chunk_bytes``
    (sender and receiver cut the same manifest alike)."""
    return [
        (index, offset, min(chunk_bytes, size - offset))
        for index, (_, size) in enumerate(manifest)
        for offset in range(0, size, chunk_bytes)
    ]


class _Sink:
    """The received files, memory-mapped: gloo receives straight into their pages.

    Each file's space is reserved first (``posix_fallocate``): a full shared-memory
    file system is then an ``OSError`` here, not a SIGBUS in the middle of a receive.
    Only this rank writes its ``.partial`` directory, so nothing truncates a file
    under the mapping."""

    def __init__(self, directory: str, manifest: list[tuple[str, int]]) -> None:
        self.maps: list[mmap.mmap | None] = []
        try:
            for name, size in manifest:
                fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
                try:
                    if size == 0:
                        self.maps.append(None)
                        continue
                    os.posix_fallocate(fd, 0, size)
                    self.maps.append(mmap.mmap(fd, size, access=mmap.ACCESS_WRITE))
                finally:
                    os.close(fd)
        except BaseException:
            self.close()
            raise

    def view(self, index: int, offset: int, length: int) -> torch.Tensor:
        mapped = self.maps[index]
        assert mapped is not None
        # the view does not keep the map: close() only once no receive can write into it
        return torch.frombuffer(mapped, dtype=torch.uint8, count=length, offset=offset)

    def close(self) -> None:
        for mapped in self.maps:
            if mapped is not None:
                mapped.close()
        self.maps = []


class _Source:
    """The sent files, read chunk by chunk into a buffer (not mapped: a file that someone
    truncates during the send must be a read error, not a SIGBUS)."""

    def __init__(self, directory: str, manifest: list[tuple[str, int]], chunk_bytes: int) -> None:
        self.paths = [os.path.join(directory, name) for name, _ in manifest]
        self.sizes = [size for _, size in manifest]
        self.buffer = torch.empty(chunk_bytes, dtype=torch.uint8)
        self.fds: dict[int, int] = {}

    def read(self, index: int, offset: int, length: int) -> torch.Tensor:
        """The bytes of file ``index`` at ``offset``; OSError when they cannot be read."""
        if index not in self.fds:
            self.close()  # files are read in order: one open at a time
            self.fds[index] = os.open(self.paths[index], os.O_RDONLY)
        view = memoryview(self.buffer.numpy())[:length]
        done = 0
        while done < length:
            got = os.preadv(self.fds[index], [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.paths[index]} shrank while it was being sent")
            done += got
        return self.buffer[:length]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


class _Target:
    """A received directory, written under ``<target>.partial`` and renamed when whole."""

    def __init__(self, target: str) -> None:
        self.partial = target + PARTIAL_SUFFIX
        self.target = target
        shutil.rmtree(self.partial, ignore_errors=True)
        os.makedirs(self.partial)

    def commit(self) -> None:
        try:  # an older copy under the same name: uncommitted first, then removed
            os.unlink(os.path.join(self.target, "metadata.json"))
        except FileNotFoundError:
            pass
        shutil.rmtree(self.target, ignore_errors=True)
        os.rename(self.partial, self.target)

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


def _round(
    group: Any,
    sends: list[tuple[torch.Tensor, int, int]],
    recvs: list[tuple[torch.Tensor, int, int]],
) -> None:
    """Post every send and receive (buffer, peer, tag), then wait for all of them.

    When one fails, the others are still waited for (each ends, or fails, within the
    group's timeout) before the error is raised: the buffers they read or write may be
    unmapped right after."""
    works = [dist.isend(buf, dst=peer, group=group, tag=tag) for buf, peer, tag in sends]
    works += [dist.irecv(buf, src=peer, group=group, tag=tag) for buf, peer, tag in recvs]
    error: BaseException | None = None
    for work in works:
        try:
            work.wait()
        except Exception as exc:
            error = error or exc
    if error is not None:
        raise error


def _global(group: Any, rank: int) -> int:
    """isend/irecv take global ranks; ``rank`` is the group's."""
    return dist.get_global_rank(group, rank) if group is not None else rank


def exchange(
    group: Any, outgoing: Outgoing | None, incoming: Incoming | None, chunk_bytes: int = CHUNK_BYTES
) -> bool | None:
    """Send ``outgoing`` and receive ``incoming`` at once (either may be None).

    Returns whether the incoming directory was received and committed (None
    when there was none to receive). A sender whose directory is missing or
    unreadable sends a refusal instead: the receiver gets False. Raises the
    group's error when a peer is gone (gloo's timeout bounds the wait).
    """
    send_peer = _global(group, outgoing.dst) if outgoing else None
    recv_peer = _global(group, incoming.src) if incoming else None
    manifest: list[tuple[str, int]] = []
    if outgoing is not None and outgoing.path is not None:
        try:
            manifest = _manifest(outgoing.path)
        except OSError:
            manifest = []
    sending = bool(manifest)
    # round 1: [has a directory, manifest length in bytes, label]
    head_out = _encoded(manifest)
    label_out = outgoing.label if outgoing else 0
    header_out = torch.tensor([int(sending), head_out.numel(), label_out], dtype=torch.int64)
    header_in = torch.zeros(3, dtype=torch.int64)
    _round(
        group,
        [(header_out, send_peer, outgoing.tag)] if outgoing else [],
        [(header_in, recv_peer, incoming.tag)] if incoming else [],
    )
    receiving = incoming is not None and bool(header_in[0])
    # another label than expected: the peers are out of step; its bytes are taken, not kept
    mislabeled = receiving and incoming is not None and int(header_in[2]) != incoming.label
    # round 2: the manifests
    head_in = torch.empty(int(header_in[1]) if receiving else 0, dtype=torch.uint8)
    _round(
        group,
        [(head_out, send_peer, outgoing.tag)] if sending and outgoing else [],
        [(head_in, recv_peer, incoming.tag)] if receiving and incoming else [],
    )
    manifest_in: list[tuple[str, int]] = (
        [(str(n), int(s)) for n, s in json.loads(bytes(head_in.numpy()))] if receiving else []
    )
    # rounds 3...: the bytes, in chunks cut per file
    pieces_out = _pieces(manifest, chunk_bytes) if sending else []
    pieces_in = _pieces(manifest_in, chunk_bytes)
    source: _Source | None = None
    read_error: BaseException | None = None
    if pieces_out and outgoing is not None and outgoing.path is not None:
        source = _Source(outgoing.path, manifest, chunk_bytes)
    target: _Target | None = None
    sink: _Sink | None = None
    write_error: BaseException | None = None
    if receiving and incoming is not None and not mislabeled:
        try:
            target = _Target(incoming.target)
            sink = _Sink(target.partial, manifest_in)
        except OSError as exc:
            write_error = exc
    scratch = torch.empty(
        min(chunk_bytes, max((n for *_, n in pieces_in + pieces_out), default=0)), dtype=torch.uint8
    )
    try:
        for i in range(max(len(pieces_out), len(pieces_in))):
            sends, recvs = [], []
            if i < len(pieces_out):
                assert outgoing is not None
                index, offset, n = pieces_out[i]
                data = None
                if source is not None and read_error is None:
                    try:
                        data = source.read(index, offset, n)
                    except OSError as exc:  # still send (zeros): the receiver waits for bytes
                        read_error = exc
                sends.append(
                    (scratch[:n].zero_() if data is None else data, send_peer, outgoing.tag)
                )
            if i < len(pieces_in):
                assert incoming is not None
                index, offset, n = pieces_in[i]
                # bytes that cannot be kept still have to be taken: the sender goes on
                into = sink.view(index, offset, n) if sink is not None else scratch[:n]
                recvs.append((into, recv_peer, incoming.tag))
            _round(group, sends, recvs)
            del sends, recvs
        # last round: whether the sender read every byte; the receiver commits only then
        status_out = torch.tensor([int(read_error is None)], dtype=torch.int64)
        status_in = torch.zeros(1, dtype=torch.int64)
        _round(
            group,
            [(status_out, send_peer, outgoing.tag)] if sending and outgoing else [],
            [(status_in, recv_peer, incoming.tag)] if receiving and incoming else [],
        )
    except BaseException:
        if sink is not None:
            sink.close()
        if target is not None:
            target.discard()
        raise
    finally:
        if source is not None:
            source.close()
    if sink is not None:
        sink.close()
    if incoming is None:
        return None
    if mislabeled:
        log.warning(
            "rank %d sent %s for label %d where %d was expected; not kept",
            incoming.src,
            incoming.target,
            int(header_in[2]),
            incoming.label,
        )
        return False
    if target is None or write_error is not None or not receiving or not bool(status_in[0]):
        if target is not None:
            target.discard()
        return False
    try:
        target.commit()
    except OSError as exc:  # every transfer is done: the peers go on, this copy is lost
        log.warning("could not commit %s: %s", incoming.target, exc)
        target.discard()
        return False
    return True
