"""Asynchronous ``Accelerator.save_state`` / ``load_state``: everything as one async_ckpt checkpoint.

``Accelerator.save_state(dir)`` writes a dozen files synchronously: the
models, optimizers, schedulers, the GradScaler, dataloader and sampler
state, one RNG file per process (with ``accelerator.step``) and one file per
object registered with ``register_for_checkpointing``. Here the same state
is staged into shared memory and written by async_ckpt's worker while
training goes on, as one checkpoint that commits atomically::

    ckpt = AcceleratorCheckpointer(accelerator)
    fut = ckpt.save_state("ckpts/step-100")   # returns once staged
    ...
    ckpt.load_state("ckpts/step-100")          # in place, checksums verified
    ckpt.close()

``save_state(accelerator, dir)`` / ``load_state(accelerator, dir)`` do the
same through one checkpointer per accelerator, made on first use.

Layout (flat keys): ``models.<i>.*`` (the unwrapped model's state dict, so a
DDP checkpoint loads without DDP), ``optimizers.<i>.*``, ``schedulers.<i>.*``,
``scaler.*``, ``dataloaders.<i>.*``, ``custom.<i>.*``, ``rng.rank<r>.*`` (one
per process, see :mod:`.accelerate_rng`), ``step`` and ``iteration``.
See docs/accelerate.md for what of accelerate's options is honoured.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

import torch.distributed as dist
from accelerate import Accelerator

from ..dist.ranks import caller_comm
from ..errors import CheckpointError, CheckpointNotFoundError
from ..executor import AsyncCheckpointer, SaveFuture
from ..executor.future import settle
from ..pipeline.load import LoadResult, run_load
from ..planning.keys import KeyCheck
from ..storage.detect import detect_reader, detect_root
from ..storage.local import FileSystemWriter
from . import accelerate_rng
from .accelerate_layout import RNG, check_supported, dataloader_state
from .accelerate_load import finish_load, prepare_load

log = logging.getLogger("async_ckpt")

_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")


def _is_local(checkpoint_id: str) -> bool:
    return FileSystemWriter.validate_checkpoint_id(checkpoint_id)


def _node_groups(accelerator: Accelerator) -> Any:
    """This rank's node group when the job spans several nodes, else None (all ranks).

    A collective: every rank creates every node's group, in the same order.
    """
    leader = accelerator.process_index - accelerator.local_process_index
    leaders: list[int] = [0] * accelerator.num_processes
    dist.all_gather_object(leaders, leader)
    nodes = sorted(set(leaders))
    if len(nodes) == 1:
        return None
    mine = None
    for node in nodes:
        group = dist.new_group([r for r, lead in enumerate(leaders) if lead == node])
        if node == leader:
            mine = group
    return mine


class AcceleratorCheckpointer:
    """Saves and loads an :class:`accelerate.Accelerator`'s whole state with async_ckpt.

    Create it on every process at the same point (after ``accelerator.prepare``
    is fine, but any time before the first save works: the objects are read at
    each save), call :meth:`save_state` on every process, and :meth:`close` at
    the end (or use it as a context manager). One save is in flight at a
    time: a save first waits for the previous one and raises its error, once,
    if it failed (as :class:`async_ckpt.CheckpointManager` does).

    ``checkpointer`` (an :class:`AsyncCheckpointer`, whose ``process_group``
    must span the processes that save together) or ``checkpointer_kwargs`` for
    a new one (``executor``, ``stager``, ``timeout``, ``on_saved``...).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        *,
        checkpointer: AsyncCheckpointer | None = None,
        **checkpointer_kwargs: Any,
    ) -> None:
        check_supported(accelerator)
        self.accelerator = accelerator
        if checkpointer is not None:
            if checkpointer_kwargs:
                raise CheckpointError(
                    f"pass either checkpointer= or options for a new one "
                    f"({sorted(checkpointer_kwargs)}), not both"
                )
            self.checkpointer, self._owns_checkpointer = checkpointer, False
        else:
            distributed = accelerator.num_processes > 1 and dist.is_initialized()
            group = None
            if distributed and accelerator.project_configuration.save_on_each_node:
                group = _node_groups(accelerator)
            self.checkpointer = AsyncCheckpointer(
                process_group=group, no_dist=not distributed, **checkpointer_kwargs
            )
            self._owns_checkpointer = True
        self._lock = threading.RLock()
        self._pending: SaveFuture | None = None
        self._writing: int | None = None  # automatic naming: the number being saved
        self._newest_saved: int | None = None  # and the one committed last: both kept
        self._closed = False

    # ----------------------------------------------------------------- helpers
    @property
    def process_group(self) -> Any:
        """The group that saves one checkpoint together (None: all ranks, or one process)."""
        return self.checkpointer.process_group

    def _group_rank(self) -> int:
        if not self.checkpointer.distributed:
            return 0
        return dist.get_rank(self.checkpointer.process_group)

    def _comm(self) -> Any:
        return caller_comm(self.checkpointer.process_group, not self.checkpointer.distributed)

    @property
    def checkpoints_root(self) -> str:
        """Where automatic checkpoint naming puts checkpoints: ``<project_dir>/checkpoints``."""
        project_dir = self.accelerator.project_dir
        if project_dir is None:
            raise CheckpointError(
                "automatic_checkpoint_naming needs ProjectConfiguration(project_dir=...)"
            )
        return os.path.join(os.fspath(project_dir), "checkpoints")

    def _numbered(self) -> dict[int, bool]:
        """``{iteration: committed}`` of the ``checkpoint_<n>`` directories under the root."""
        found = {}
        for name, committed in detect_root(self.checkpoints_root).children().items():
            match = _CHECKPOINT_DIR.match(name)
            if match is not None:
                found[int(match[1])] = committed
        return found

    def latest_checkpoint(self) -> str | None:
        """With automatic naming: the newest committed ``checkpoint_<n>``, or None."""
        committed = [n for n, done in self._numbered().items() if done]
        return f"{self.checkpoints_root}/checkpoint_{max(committed)}" if committed else None

    # ------------------------------------------------------------------- saves
    def _gather(self, exists: bool) -> list[tuple[int, dict[str, Any], bool]]:
        """One collective: every process's generators (taken now, before the save
        hooks run) and whether it found the target taken, so that all refuse together."""
        mine = (self.accelerator.process_index, accelerate_rng.capture(), exists)
        return self._comm().all_gather_object(mine)

    def _state(self, weights: list[Any], gathered: list[Any]) -> dict[str, Any]:
        """The state one checkpoint holds (see the module's docstring for its keys)."""
        acc = self.accelerator
        state: dict[str, Any] = {
            "models": dict(enumerate(weights)),
            "optimizers": dict(enumerate(acc._optimizers)),
            "schedulers": dict(enumerate(acc._schedulers)),
            "dataloaders": {i: dataloader_state(dl) for i, dl in enumerate(acc._dataloaders)},
            "custom": dict(enumerate(acc._custom_objects)),
            RNG: {f"rank{rank}": states for rank, states, _ in gathered},
            "step": acc.step,
            "iteration": acc.save_iteration,
        }
        if acc.scaler is not None:
            state["scaler"] = acc.scaler
        return state

    def start(self) -> AcceleratorCheckpointer:
        """Start the worker and allocate the staging memory for the current state now,
        so that the first save stalls no longer than later ones. Call it on every
        process (a collective), after ``accelerator.prepare``."""
        self._check_open()
        weights = [self.accelerator.unwrap_model(m).state_dict() for m in self.accelerator._models]
        self.checkpointer.start(self._state(weights, self._gather(False)))
        return self

    def save_state(self, output_dir: str | os.PathLike | None = None) -> SaveFuture:
        """Stage the accelerator's state and write it in the background; returns a SaveFuture.

        What ``Accelerator.save_state`` saves, as one checkpoint at ``output_dir``
        (with ``automatic_checkpoint_naming``: ``<project_dir>/checkpoints/
        checkpoint_<iteration>``, ``output_dir`` ignored, as accelerate does).
        The state may change as soon as this returns (with the default,
        synchronous staging). ``project_configuration.iteration`` is increased
        by one, as accelerate does. The save pre-hooks run first, with the
        models, their (unwrapped) state dicts and the checkpoint id; weights a
        hook removes from the list are not saved.
        """
        self._check_open()
        acc = self.accelerator
        check_supported(acc)
        self._collect(None)
        config = acc.project_configuration
        auto = config.automatic_checkpoint_naming
        if auto:
            checkpoint_id = f"{self.checkpoints_root}/checkpoint_{acc.save_iteration}"
            exists = self._numbered().get(acc.save_iteration, False)
        elif output_dir is None:
            raise CheckpointError(
                "save_state needs output_dir unless ProjectConfiguration("
                "automatic_checkpoint_naming=True)"
            )
        else:
            checkpoint_id, exists = os.fspath(output_dir), False
        gathered = self._gather(exists)
        if any(taken for _, _, taken in gathered):
            raise CheckpointError(
                f"checkpoint {checkpoint_id!r} ({acc.save_iteration}) already exists; set "
                "accelerator.project_configuration.iteration to the iteration to go on from"
            )
        if _is_local(checkpoint_id):  # as accelerate: the hooks may write files into it
            os.makedirs(checkpoint_id.removeprefix("file://"), exist_ok=True)
        weights = [acc.unwrap_model(model).state_dict() for model in acc._models]
        for hook in acc._save_model_state_pre_hook.values():
            hook(acc._models, weights, checkpoint_id)
        state = self._state(weights, gathered)
        future = self.checkpointer.save(state, checkpoint_id=checkpoint_id)
        number = config.iteration
        config.iteration += 1
        with self._lock:
            self._pending = future
            self._writing = number if auto else None
        if auto and config.total_limit is not None:
            future.add_done_callback(lambda fut: self._after_commit(fut, number))
        return future

    def _collect(self, timeout: float | None) -> None:
        """Wait for the pending save; raise its error (not a cancellation) once."""
        with self._lock:
            future = self._pending
        if future is None:
            return
        if not settle(future, timeout, lambda: self._forget(future)):
            return
        with self._lock:
            if self._pending is future and self._writing is not None:
                self._newest_saved = self._writing  # before the done callback may have run
        self._forget(future)

    def _forget(self, future: SaveFuture) -> None:
        with self._lock:
            if self._pending is future:
                self._pending = None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the pending save committed and ``total_limit`` was applied;
        raise the save's error if it failed."""
        self._collect(timeout)
        self._retain_logged()

    # --------------------------------------------------------------- retention
    def _after_commit(self, future: SaveFuture, number: int) -> None:
        """Done callback of a save (the executor's thread): retention after a commit."""
        if future.cancelled() or future.exception() is not None:
            return  # nothing is deleted for a failed save
        with self._lock:
            self._newest_saved = number
        self._retain_logged()

    def _retain_logged(self) -> None:
        config = self.accelerator.project_configuration
        if not config.automatic_checkpoint_naming or config.total_limit is None:
            return
        try:
            self.retain()
        except Exception as exc:  # a failed deletion must not stop training
            log.warning("retention under %s failed: %s", self.checkpoints_root, exc)

    def retain(self) -> list[str]:
        """Apply ``total_limit``: delete the oldest committed ``checkpoint_<n>``; returns them.

        Keeps the ``total_limit`` newest committed checkpoints (by number) and
        the one this checkpointer committed last. Runs after each commit
        (accelerate deletes before the save, so a failed save would leave one
        checkpoint fewer); leftovers of failed saves older than the newest
        committed one go too, never the one a save is writing. Only rank 0 of
        the saving group deletes.
        """
        limit = self.accelerator.project_configuration.total_limit
        if limit is None or self._group_rank() != 0:
            return []
        with self._lock:
            pending = self._pending
            busy = {self._newest_saved}
            if pending is not None and not pending.done():
                busy.add(self._writing)
            found = self._numbered()
            committed = sorted(n for n, done in found.items() if done)
            if not committed:
                return []
            doomed = committed[: max(0, len(committed) - max(limit, 1))]
            doomed += [n for n, done in found.items() if not done and n < committed[-1]]
            root = detect_root(self.checkpoints_root)
            removed = []
            for n in sorted(doomed):
                if n in busy:
                    continue
                cid = f"{self.checkpoints_root}/checkpoint_{n}"
                root.delete(f"checkpoint_{n}")
                removed.append(cid)
                log.info("removed checkpoint %s (total_limit=%d)", cid, limit)
            return removed

    # ------------------------------------------------------------------- loads
    def load_state(
        self,
        input_dir: str | os.PathLike | None = None,
        *,
        strict: KeyCheck = True,
        verify: bool = True,
        allow_lossy_cast: bool = False,
    ) -> LoadResult:
        """Restore what :meth:`save_state` saved, in place; returns the load's key report.

        ``input_dir`` None with ``automatic_checkpoint_naming`` picks the newest
        committed ``checkpoint_<n>``. With automatic naming the load sets
        ``project_configuration.iteration`` to the loaded checkpoint's iteration
        plus one, so the next save does not collide with it. A pending save
        is waited for first (its error raised). The load pre-hooks run first with
        the models and the checkpoint id; models a hook removes are not loaded.
        This process's generators are restored from ``rng.rank<process_index>``;
        a checkpoint without them (saved by fewer processes) leaves them as they
        are, with a warning. ``strict``, ``verify`` and ``allow_lossy_cast`` are
        :func:`async_ckpt.load`'s.
        """
        self._check_open()
        acc = self.accelerator
        check_supported(acc)
        self._collect(None)
        auto = acc.project_configuration.automatic_checkpoint_naming
        if input_dir is not None:
            checkpoint_id = os.fspath(input_dir)
        elif auto:
            latest = self.latest_checkpoint()
            if latest is None:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint_<n> under {self.checkpoints_root!r}"
                )
            checkpoint_id = latest
        else:
            raise CheckpointError(
                "load_state needs input_dir unless ProjectConfiguration("
                "automatic_checkpoint_naming=True)"
            )
        state, meta = prepare_load(acc, checkpoint_id)
        result = run_load(
            state,
            detect_reader(checkpoint_id),
            strict=strict,
            verify=verify,
            allow_lossy_cast=allow_lossy_cast,
            metadata=meta,
            comm=self._comm(),
        )
        finish_load(acc, state, auto)
        log.info("loaded accelerator state from %s", checkpoint_id)
        return result

    # --------------------------------------------------------------- lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this AcceleratorCheckpointer is closed; create a new one")

    def close(self) -> None:
        """Finish the pending save, apply ``total_limit`` and stop the worker (if this
        object made it).

        A failure of the pending save is logged, not raised; call ``wait()``
        first to handle it.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._collect(None)
        except Exception:  # logged by the checkpointer
            pass
        self._retain_logged()
        if self._owns_checkpointer:
            self.checkpointer.close()

    def __enter__(self) -> AcceleratorCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SHARED_ATTR = "_async_ckpt_checkpointer"


def checkpointer_for(accelerator: Accelerator, **options: Any) -> AcceleratorCheckpointer:
    """The :class:`AcceleratorCheckpointer` that :func:`save_state` and :func:`load_state`
    use for ``accelerator``: made on first use (on every process), kept on the
    accelerator, made afresh after ``close()``; it closes at interpreter exit.

    ``options`` (``executor=``, ``stager=``, ``checkpointer=``... as for
    :class:`AcceleratorCheckpointer`) configure it; they can only be given
    before it is made.
    """
    ckpt = getattr(accelerator, _SHARED_ATTR, None)
    if ckpt is None or ckpt._closed:
        ckpt = AcceleratorCheckpointer(accelerator, **options)
        setattr(accelerator, _SHARED_ATTR, ckpt)
    elif options:
        raise CheckpointError(
            f"this accelerator's checkpointer exists already; options {sorted(options)} "
            "can only be given before its first use (or after its close())"
        )
    return ckpt


def save_state(accelerator: Accelerator, output_dir: str | os.PathLike | None = None) -> SaveFuture:
    """``accelerator.save_state(output_dir)``, asynchronously: see
    :meth:`AcceleratorCheckpointer.save_state`. Call it on every process."""
    return checkpointer_for(accelerator).save_state(output_dir)


def load_state(
    accelerator: Accelerator, input_dir: str | os.PathLike | None = None, **options: Any
) -> LoadResult:
    """``accelerator.load_state(input_dir)`` for a checkpoint :func:`save_state` wrote:
    see :meth:`AcceleratorCheckpointer.load_state`. Call it on every process."""
    return checkpointer_for(accelerator).load_state(input_dir, **options)


__all__: list[str] = [
    "AcceleratorCheckpointer",
    "checkpointer_for",
    "load_state",
    "save_state",
]
