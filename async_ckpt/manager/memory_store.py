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
from .root import StepStore, parse_step_dir, step_dir_name

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
    return StepStore(directory).committed()


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
        ``.partial`` ones); returns the steps deleted. Each goes metadata first
        (:meth:`StepStore.remove`), so a crash midway leaves no committed step with
        missing files."""
        steps = StepStore(directory)
        removed = sorted(step for step in steps.scan() if step not in keep)
        for step in removed:
            steps.remove(step)
        for step in _partial_steps(directory):
            shutil.rmtree(
                os.path.join(directory, step_dir_name(step) + PARTIAL_SUFFIX), ignore_errors=True
            )
        return removed


def _partial_steps(directory: str) -> list[int]:
    """The steps of the unfinished replicas (``step-<step>.partial``) in ``directory``."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    steps = []
    for name in names:
        step = parse_step_dir(name.removesuffix(PARTIAL_SUFFIX))
        if name.endswith(PARTIAL_SUFFIX) and step is not None:
            steps.append(step)
    return steps


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
            steps = StepStore(path)
            infos = [steps.info(step, True) for step in steps.committed()]
            rows.append((world, holder, [i.step for i in infos], sum(i.size for i in infos)))
    return rows


def clear_memory_root(root: str) -> bool:
    """Delete a memory root and everything in it (all ranks' snapshots on this node);
    returns whether there was one. For after a job, or before one that must not resume
    from memory, when no job of that root runs on the node: ``async-ckpt memory ROOT
    --clear``."""
    if not os.path.isdir(root):
        return False
    shutil.rmtree(root)
    return True
