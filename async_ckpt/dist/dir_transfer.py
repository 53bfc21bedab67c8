"""Copy a checkpoint directory from one rank to another over a gloo group.

The memory tier sends each rank's newest in-memory checkpoint to a peer on
another node, and a restarted rank fetches its copy back from that peer. Both
use :func:`exchange`: every rank of the group may send one directory and
receive one, in lockstep rounds whose sends and receives are all posted
before any is waited on, so a ring of ranks that each send and receive never
deadlocks. Files travel as one stream cut into chunks of at most
:data:`CHUNK_BYTES` (memory held per rank: two chunks, not the checkpoint).

What is received is written under ``<target>.partial`` and renamed to
``target`` only once every byte arrived: a rank killed mid-transfer leaves a
``.partial`` directory, which nothing reads. The bytes are not checked here;
the checkpoint's own checksums are, when it is loaded.
"""

from __future__ import annotations

import json
import logging
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


class _Reader:
    """The files of a manifest as one stream, read chunk by chunk."""

    def __init__(self, path: str, manifest: list[tuple[str, int]]) -> None:
        self.files = [(os.path.join(path, n), size) for n, size in manifest]
        self.index = 0
        self.handle: Any = None
        self.left = 0

    def read_into(self, buf: torch.Tensor) -> None:
        view = memoryview(buf.numpy())
        filled = 0
        while filled < len(view):
            if self.left == 0:
                if self.handle is not None:
                    self.handle.close()
                name, self.left = self.files[self.index]
                self.index += 1
                self.handle = open(name, "rb")  # noqa: SIM115 (closed when its bytes are sent)
                continue
            want = min(self.left, len(view) - filled)
            got = self.handle.readinto(view[filled : filled + want])
            if not got:
                raise OSError(f"{self.handle.name} shrank while it was being sent")
            filled += got
            self.left -= got

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


class _Writer:
    """Writes the received stream into the manifest's files under ``<target>.partial``."""

    def __init__(self, target: str, manifest: list[tuple[str, int]]) -> None:
        self.partial = target + PARTIAL_SUFFIX
        self.target = target
        shutil.rmtree(self.partial, ignore_errors=True)
        os.makedirs(self.partial)
        self.files = [(os.path.join(self.partial, n), size) for n, size in manifest]
        self.index = 0
        self.handle: Any = None
        self.left = 0
        for name, size in self.files:  # empty files have no bytes in the stream
            if size == 0:
                open(name, "wb").close()

    def write(self, buf: torch.Tensor) -> None:
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            if self.left == 0:
                if self.handle is not None:
                    self.handle.close()
                while self.files[self.index][1] == 0:
                    self.index += 1
                name, self.left = self.files[self.index]
                self.index += 1
                self.handle = open(name, "wb")  # noqa: SIM115
            n = min(self.left, len(view) - done)
            self.handle.write(view[done : done + n])
            done += n
            self.left -= n

    def commit(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        try:  # an older copy under the same name: uncommitted first, then removed
            os.unlink(os.path.join(self.target, "metadata.json"))
        except FileNotFoundError:
            pass
        shutil.rmtree(self.target, ignore_errors=True)
        os.rename(self.partial, self.target)

    def discard(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        shutil.rmtree(self.partial, ignore_errors=True)


def _round(
    group: Any,
    sends: list[tuple[torch.Tensor, int, int]],
    recvs: list[tuple[torch.Tensor, int, int]],
) -> None:
    """Post every send and receive (buffer, peer, tag), then wait for all of them."""
    works = [dist.isend(buf, dst=peer, group=group, tag=tag) for buf, peer, tag in sends]
    works += [dist.irecv(buf, src=peer, group=group, tag=tag) for buf, peer, tag in recvs]
    for work in works:
        work.wait()


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
    # rounds 3...: the bytes, in chunks
    total_out = sum(s for _, s in manifest) if sending else 0
    total_in = sum(s for _, s in manifest_in)
    reader = _Reader(outgoing.path, manifest) if sending and outgoing and outgoing.path else None
    writer: _Writer | None = None
    write_error: BaseException | None = None
    if receiving and incoming is not None and not mislabeled:
        try:
            writer = _Writer(incoming.target, manifest_in)
        except OSError as exc:
            write_error = exc
    out_buf = torch.empty(min(chunk_bytes, total_out), dtype=torch.uint8)
    in_buf = torch.empty(min(chunk_bytes, total_in), dtype=torch.uint8)
    read_error: BaseException | None = None
    sent = got = 0
    try:
        while sent < total_out or got < total_in:
            sends, recvs = [], []
            n_out = min(chunk_bytes, total_out - sent)
            n_in = min(chunk_bytes, total_in - got)
            if n_out:
                assert reader is not None and outgoing is not None
                if read_error is None:
                    try:  # keep sending after a failed read: the receiver waits for the bytes
                        reader.read_into(out_buf[:n_out])
                    except OSError as exc:
                        read_error = exc
                sends.append((out_buf[:n_out], send_peer, outgoing.tag))
            if n_in:
                assert incoming is not None
                recvs.append((in_buf[:n_in], recv_peer, incoming.tag))
            _round(group, sends, recvs)
            sent += n_out
            got += n_in
            if n_in and writer is not None and write_error is None:
                try:  # keep receiving after a failed write: the sender goes on sending
                    writer.write(in_buf[:n_in])
                except OSError as exc:
                    write_error = exc
        # last round: whether the sender read every byte; the receiver commits only then
        status_out = torch.tensor([int(read_error is None)], dtype=torch.int64)
        status_in = torch.zeros(1, dtype=torch.int64)
        _round(
            group,
            [(status_out, send_peer, outgoing.tag)] if sending and outgoing else [],
            [(status_in, recv_peer, incoming.tag)] if receiving and incoming else [],
        )
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    finally:
        if reader is not None:
            reader.close()
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
    if writer is None or write_error is not None or not receiving or not bool(status_in[0]):
        if writer is not None:
            writer.discard()
        return False
    writer.commit()
    return True
