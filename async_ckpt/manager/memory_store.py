"""Where the memory tier's checkpoints lie on a node, and which of them are whole.

Under a memory root (by default ``/dev/shm/async_ckpt/<hash of the storage
root>``: shared memory, which outlives the training processes until it is
deleted or the node reboots) a job of ``W`` ranks keeps::

    world-<W>/rank-<r>/step-<step:08d>/        rank r's own snapshot (a checkpoint)
    world-<W>/replica-of-<r>/step-<step:08d>/  a copy of rank r's, held for it by a peer

Each is an ordinary checkpoint directory of one rank (metadata last, with
checksums); one is *committed* once its ``metadata.json`` exists. A replica
is received under ``step-<step>.partial`` and renamed when complete. Ranks
that share a node share the memory root; each rank writes and deletes only
its own ``rank-<r>`` and the ``replica-of-<src>`` it receives. The world
size is part of the path: snapshots of another world size never match.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field

from ..dist.dir_transfer import PARTIAL_SUFFIX
from ..format.names import METADATA_FILE
from .root import parse_step_dir, step_dir_name

MEMORY_DIR_ENV = "ASYNC_CKPT_MEMORY_DIR"
"""The directory that holds the memory roots of all jobs on a node (default
``/dev/shm/async_ckpt``, else the temporary directory when there is no /dev/shm)."""


def memory_parent() -> str:
    """The directory under which jobs' memory roots are made by default."""
    chosen = os.environ.get(MEMORY_DIR_ENV)
    if chosen:
        return chosen
    if os.path.isdir("/dev/shm"):
        return "/dev/shm/async_ckpt"
    import tempfile

    return os.path.join(tempfile.gettempdir(), "async_ckpt-memory")


def default_memory_root(storage_root: str) -> str:
    """The memory root of the job that saves to ``storage_root``: the same on every
    restart of the job (and on each of its nodes), another for another root (a
    local path counts resolved: a relative one names the directory it means)."""
    # a local root however it is spelled ("ckpt", "./ckpt", "/abs/ckpt"), a URL as given
    where = storage_root if "://" in storage_root else os.path.realpath(storage_root)
    tag = hashlib.sha256(where.encode()).hexdigest()[:16]
    return os.path.join(memory_parent(), tag)


@dataclass(frozen=True)
class Inventory:
    """The committed memory-tier steps a rank can read on its node: its own, and the
    replicas it holds for other ranks (``{source rank: steps}``)."""

    own: tuple[int, ...] = ()
    replicas: dict[int, tuple[int, ...]] = field(default_factory=dict)


def committed_steps(directory: str) -> list[int]:
    """The committed step directories in ``directory``, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    steps = []
    for name in names:
        step = parse_step_dir(name)
        if step is not None and os.path.isfile(os.path.join(directory, name, METADATA_FILE)):
            steps.append(step)
    return sorted(steps)


class MemoryStore:
    """One rank's view of a node's memory root."""

    def __init__(self, root: str, rank: int, world_size: int) -> None:
        self.root = root
        self.rank = rank
        self.world_size = world_size
        self.base = os.path.join(root, f"world-{world_size}")

    def own_dir(self) -> str:
        return os.path.join(self.base, f"rank-{self.rank}")

    def replica_dir(self, src: int) -> str:
        return os.path.join(self.base, f"replica-of-{src}")

    def own_step(self, step: int) -> str:
        return os.path.join(self.own_dir(), step_dir_name(step))

    def replica_step(self, src: int, step: int) -> str:
        return os.path.join(self.replica_dir(src), step_dir_name(step))

    def inventory(self) -> Inventory:
        """What this rank can read: its own committed steps and the replicas on its node
        (the replicas of every rank, whoever received them)."""
        replicas: dict[int, tuple[int, ...]] = {}
        try:
            names = os.listdir(self.base)
        except FileNotFoundError:
            names = []
        for name in names:
            src = name.removeprefix("replica-of-")
            if src != name and src.isdigit() and int(src) < self.world_size:
                steps = committed_steps(os.path.join(self.base, name))
                if steps:
                    replicas[int(src)] = tuple(steps)
        return Inventory(tuple(committed_steps(self.own_dir())), replicas)

    def clear_rank(self, received_from: int | None) -> None:
        """Delete this rank's own snapshots and the replicas it received from ``received_from``."""
        self.prune(self.own_dir(), set())
        if received_from is not None:
            self.prune(self.replica_dir(received_from), set())

    def prune(self, directory: str, keep: set[int]) -> list[int]:
        """Delete the step directories of ``directory`` not in ``keep`` (and unfinished
        ``.partial`` ones); returns the steps deleted. The metadata goes first, so a
        crash midway leaves no committed step with missing files."""
        removed = []
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return removed
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(PARTIAL_SUFFIX) and parse_step_dir(name[: -len(PARTIAL_SUFFIX)]):
                shutil.rmtree(path, ignore_errors=True)
                continue
            step = parse_step_dir(name)
            if step is None or step in keep:
                continue
            try:
                os.unlink(os.path.join(path, METADATA_FILE))
            except FileNotFoundError:
                pass
            shutil.rmtree(path, ignore_errors=True)
            removed.append(step)
        return sorted(removed)


def _dir_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(path, n))
        for n in os.listdir(path)
        if os.path.isfile(os.path.join(path, n))
    )


def memory_contents(root: str) -> list[tuple[str, str, list[int], int]]:
    """What a memory root holds on this node: ``(world-<W>, rank-<r> or replica-of-<r>,
    committed steps, bytes)`` per directory, sorted."""
    rows = []
    for world in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        world_dir = os.path.join(root, world)
        if not world.startswith("world-") or not os.path.isdir(world_dir):
            continue
        for holder in sorted(os.listdir(world_dir)):
            path = os.path.join(world_dir, holder)
            if not os.path.isdir(path):
                continue
            steps = committed_steps(path)
            size = sum(_dir_bytes(os.path.join(path, step_dir_name(s))) for s in steps)
            rows.append((world, holder, steps, size))
    return rows


def clear_memory_root(root: str) -> bool:
    """Delete a memory root and everything in it (all ranks' snapshots on this node);
    returns whether there was one. For after a job, or before one that must not resume
    from memory: ``async-ckpt memory-clear`` and ``CheckpointManager.clear_memory()``."""
    if not os.path.isdir(root):
        return False
    shutil.rmtree(root)
    return True
