"""PyTorch Lightning ``CheckpointIO`` that saves with async_ckpt.

``Trainer(plugins=[AsyncCkptIO()])``: every checkpoint Lightning writes
(``ModelCheckpoint``, ``trainer.save_checkpoint``) is staged into shared
memory and written by async_ckpt's worker process while training goes on;
each is an async_ckpt checkpoint directory at the path Lightning chose.
See docs/lightning.md.

Importing this module also teaches ``LightningModule.load_from_checkpoint``
(and ``LightningDataModule.load_from_checkpoint``) to read those directories:
it wraps ``pytorch_lightning.core.saving.pl_load``, the loader those methods
call, so that an async_ckpt checkpoint goes to :func:`load_checkpoint` and any
other path to Lightning's own loader, unchanged.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_all
from dataclasses import dataclass
from typing import Any, Literal

from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO

from ..api import delete
from ..executor import AsyncCheckpointer, SaveFuture, SaveStats
from ..staging import Stager
from ..storage.base import StorageWriter
from ..storage.detect import detect_writer
from ..threads import Workers
from .lightning_format import (
    RECORD_KEY,
    identity,
    is_async_ckpt_checkpoint,
    is_url,
    read_checkpoint,
    state_to_save,
)

__all__ = ["RECORD_KEY", "AsyncCkptIO", "is_async_ckpt_checkpoint", "load_checkpoint"]

log = logging.getLogger("async_ckpt")
_LIGHTNING_VERSION_KEY = "pytorch-lightning_version"  # in every Trainer checkpoint


# ---------------------------------------------------------------------------- loading
def load_checkpoint(path: Any, map_location: Any = None, *, verify: bool = True) -> dict[str, Any]:
    """The Lightning checkpoint dict stored at ``path`` by :class:`AsyncCkptIO`.

    Every tensor is read into CPU memory (checksums verified unless
    ``verify=False``), then moved as ``map_location`` says, with torch.load's
    meaning: a device or device string, a ``{"cpu": device}`` dict, or a
    function ``(storage, "cpu") -> storage or None``. ``None`` keeps the CPU.
    A save of ``path`` that an :class:`AsyncCkptIO` of this process still has
    in flight is awaited first (and its error raised, if it failed).
    Hyper-parameter classes the save recorded are allowed again first (see
    docs/lightning.md); objects are always read through the allow-list, so
    Lightning's ``weights_only`` changes nothing here.
    """
    _await_saves_of(identity(path))
    return read_checkpoint(path, map_location, verify=verify)


def _install_load_from_checkpoint_hook() -> bool:
    """Route ``load_from_checkpoint`` of async_ckpt directories to :func:`load_checkpoint`.

    ``LightningModule.load_from_checkpoint`` calls ``pl_load`` from
    ``pytorch_lightning.core.saving``'s namespace at call time; that name is
    replaced by a wrapper that hands every other path to the original. Returns
    False (with a warning) if this Lightning has no such name.
    """
    try:
        from pytorch_lightning.core import saving
    except ImportError:  # pragma: no cover - pytorch_lightning is this module's dependency
        return False
    original = getattr(saving, "pl_load", None)
    if original is None or not callable(original):
        warnings.warn(
            "async_ckpt: this pytorch_lightning has no core.saving.pl_load, so "
            "LightningModule.load_from_checkpoint cannot read async_ckpt checkpoints; use "
            "async_ckpt.integrations.lightning.load_checkpoint(path) instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    if getattr(original, "_async_ckpt_hook", False):
        return True

    @functools.wraps(original)
    def pl_load(path_or_url: Any, map_location: Any = None, weights_only: Any = None) -> Any:
        if _saving(path_or_url) or is_async_ckpt_checkpoint(path_or_url):
            return load_checkpoint(path_or_url, map_location=map_location)
        return original(path_or_url, map_location=map_location, weights_only=weights_only)

    pl_load._async_ckpt_hook = True  # type: ignore[attr-defined]
    saving.pl_load = pl_load
    return True


LOAD_FROM_CHECKPOINT_HOOKED = _install_load_from_checkpoint_hook()


# ---------------------------------------------------------------------------- saving
def _covers(removed: str, saving: str) -> bool:
    """Whether deleting ``removed`` would delete what is saved at ``saving``."""
    return saving == removed or saving.startswith(removed.rstrip("/") + "/")


def _remove(text: str, saves: list[SaveFuture]) -> None:
    """Delete the checkpoint at ``text`` once ``saves`` (those of that path) have finished."""
    for save in saves:
        try:
            save.exception()  # waits: a checkpoint being written is never deleted
        except BaseException:  # cancelled: its outcome is reported by its plugin
            pass
    if not is_url(text):
        local = text.removeprefix("file://")
        if os.path.islink(local) or os.path.isfile(local):
            os.unlink(local)  # a link (save_last="link") goes alone, never its target
            return
        if not os.path.isdir(local):
            return
    # metadata first; refused while another checkpointer of this process writes it
    delete(text, force=True)


def _start_quietly(checkpointer: AsyncCheckpointer) -> None:
    try:
        checkpointer.start()
    except Exception as exc:  # the next save starts a worker again, and reports its failure
        log.warning("async_ckpt: starting the checkpoint worker early failed: %s", exc)


@dataclass
class _Pending:
    future: SaveFuture
    identity: str


_LIVE: weakref.WeakSet[AsyncCkptIO] = weakref.WeakSet()


def _saving(path: Any) -> bool:
    """Whether an AsyncCkptIO of this process has a save of ``path`` in flight."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    wanted = identity(path)
    return any(save.identity == wanted for io in list(_LIVE) for save in list(io._saves))


def _await_saves_of(wanted: str) -> None:
    """Wait for the saves and removals of ``wanted`` in flight in this process;
    raise a failed save's error.

    Lightning's FSDP and ModelParallel strategies never call the CheckpointIO's
    teardown, so a fit can end with a save still running; a load of that path
    in the same process must not read it half written. The error stays with
    its plugin too (its next save or teardown raises it).
    """
    for io in list(_LIVE):
        io._await_removal_of(wanted)
        for save in list(io._saves):
            if save.identity == wanted:
                error = save.future.exception()
                if error is not None:
                    raise error


class AsyncCkptIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that saves asynchronously with async_ckpt.

    ``save_checkpoint`` returns as soon as the checkpoint is staged; the write
    and commit happen in async_ckpt's worker process. Before the next save,
    and at ``teardown``, the previous save is awaited and its error, if any,
    raised there (with ``Stager(num_buffers=n)``, up to n saves stay in
    flight). ``remove_checkpoint`` returns at once: a background thread
    deletes, after a save of that path still in flight has finished (a later
    save of the path waits for the deletion). Dicts other than Trainer
    checkpoints (the weights the ``ddp_spawn`` launcher hands back to the main
    process, which reads them at once) are saved synchronously.

    Args:
        executor: ``"process"`` (default: a persistent worker process) or ``"thread"``.
        stager: an ``async_ckpt.Stager`` (staging options); one is made otherwise.
        storage_writer: ``fn(path, **storage_options) -> StorageWriter``; by
            default the writer is detected from the path (local or fsspec URL),
            and ``storage_options`` from ``trainer.save_checkpoint`` are its
            keyword options (``{"sync_files": False}``).
        timeout: seconds a save may take before it fails (``SaveTimeoutError``).
        on_saved: called with each committed save's ``SaveStats``, on a background thread.
        no_dist: save each process's checkpoint alone (default True). Lightning's
            strategies call ``save_checkpoint`` on global rank 0 only, so key
            validation across ranks would wait for ranks that never save.
        allow_hparams_classes: allow-list the plain dataclasses and enums found in
            the hyper-parameters (docs/lightning.md says which qualify).
        verify: verify checksums on loads.
    """

    def __init__(
        self,
        *,
        executor: Literal["process", "thread"] = "process",
        stager: Stager | None = None,
        storage_writer: Callable[..., StorageWriter] | None = None,
        timeout: float | None = None,
        on_saved: Callable[[SaveStats], None] | None = None,
        no_dist: bool = True,
        allow_hparams_classes: bool = True,
        verify: bool = True,
    ) -> None:
        super().__init__()
        self.executor = executor
        self.stager = stager
        self.storage_writer = storage_writer
        self.timeout = timeout
        self.on_saved = on_saved
        self.no_dist = no_dist
        self.allow_hparams_classes = allow_hparams_classes
        self.verify = verify
        self._checkpointer: AsyncCheckpointer | None = None
        self._saves: list[_Pending] = []  # in flight, or over but not yet reported; oldest first
        self._starting: threading.Thread | None = None
        self._remover: Workers | None = None
        self._removals: list[tuple[str, Future]] = []
        _LIVE.add(self)

    # ------------------------------------------------------------------ state
    @property
    def checkpointer(self) -> AsyncCheckpointer | None:
        """The AsyncCheckpointer of this fit (None before the first save and after teardown)."""
        return self._checkpointer

    @property
    def pending(self) -> SaveFuture | None:
        """The future of the latest save until it has been awaited."""
        return self._saves[-1].future if self._saves else None

    def start(self, wait: bool = False) -> None:
        """Start the worker process now, in the background, instead of at the first save.

        The worker imports torch before it can write (seconds): started at the
        first save, it makes the save right after that one wait. Call this
        before ``trainer.fit`` in the process that saves (global rank 0);
        ``wait=True`` returns once the worker is ready.
        """
        checkpointer = self._ensure_checkpointer()
        if self._starting is None:
            self._starting = threading.Thread(
                target=_start_quietly, args=(checkpointer,), name="async_ckpt-start", daemon=True
            )
            self._starting.start()
        if wait:
            self._started()

    def _ensure_checkpointer(self) -> AsyncCheckpointer:
        if self._checkpointer is None:
            self._checkpointer = AsyncCheckpointer(
                executor=self.executor,
                stager=self.stager,
                no_dist=self.no_dist,
                timeout=self.timeout,
                on_saved=self.on_saved,
            )
        return self._checkpointer

    def _started(self) -> AsyncCheckpointer:
        """The checkpointer, once a background start() is over (never used concurrently)."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        return self._ensure_checkpointer()

    def wait(self) -> None:
        """Block until the latest save committed and the removals are done; raise the
        first error (once) of those that failed."""
        errors = [*self._finish_saves(), *self._finish_removals()]
        if errors:
            raise errors[0]

    def _finish_saves(self, keep: int = 0) -> list[BaseException]:
        """Errors of the saves that are over, waiting until at most ``keep`` are in flight."""
        errors: list[BaseException] = []
        while self._saves and (len(self._saves) > keep or self._saves[0].future.done()):
            save = self._saves.pop(0)
            try:
                save.future.result()
            except Exception as exc:
                errors.append(exc)
        return errors

    def _finish_removals(self, block: bool = True) -> list[BaseException]:
        """Errors of the removals that are over (all of them, waited for, if ``block``)."""
        if block:
            wait_all([future for _, future in self._removals])
        over = [(i, f) for i, f in self._removals if f.done()]
        self._removals = [(i, f) for i, f in self._removals if not f.done()]
        return [e for _, f in over if (e := f.exception()) is not None]

    def _await_removal_of(self, wanted: str) -> None:
        """Wait for the removals that would delete ``wanted`` or something in it."""
        for removed, future in list(self._removals):
            if _covers(removed, wanted) or _covers(wanted, removed):
                wait_all([future])

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _LIVE.add(self)

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the strategy (and this plugin) into its processes
        state = self.__dict__.copy()
        state["_checkpointer"] = None
        state["_saves"] = []
        state["_starting"] = None
        state["_remover"] = None
        state["_removals"] = []
        return state

    # ------------------------------------------------------------------ CheckpointIO
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        """Stage ``checkpoint`` and return; the worker writes it to ``path``.

        The previous save is awaited first (with ``Stager(num_buffers=n)``, the
        one n saves back). If one failed (or a removal did), this checkpoint is
        still staged (the storage may have recovered), then that error is raised.
        """
        stager = self.stager or self._started().stager
        errors = [
            *self._finish_saves(keep=stager.options.num_buffers - 1),
            *self._finish_removals(block=False),
        ]
        try:
            self._save(checkpoint, path, storage_options)
        finally:
            if errors:
                raise errors[0]

    def _save(self, checkpoint: dict[str, Any], path: Any, storage_options: Any) -> None:
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise TypeError(
                "AsyncCkptIO takes storage_options as a dict of keyword options for the storage "
                f"writer (e.g. {{'sync_files': False}}), not {type(storage_options).__qualname__}"
            )
        options = dict(storage_options or {})
        text = os.fspath(path)
        if not is_url(text):
            # at once, as TorchCheckpointIO does: ModelCheckpoint(save_last="link") links
            # last.ckpt to this path right after this call, before the worker writes
            os.makedirs(
                os.path.dirname(os.path.abspath(text.removeprefix("file://"))), exist_ok=True
            )
        writer = (self.storage_writer or detect_writer)(text, **options)
        state = state_to_save(checkpoint, self.allow_hparams_classes)
        self._await_removal_of(identity(text))  # a removal queued before must not hit it
        local = text.removeprefix("file://")
        if not is_url(text) and os.path.islink(local):
            # last.ckpt linked by an earlier save_last="link" run: replace the link, as
            # torch.save's file would, never write into the checkpoint it points to
            os.unlink(local)
        future = self._started().save(state, storage_writer=writer)
        self._saves.append(_Pending(future, identity(path)))
        if _LIGHTNING_VERSION_KEY not in checkpoint:
            self.wait()  # not a Trainer checkpoint: its reader may not wait for us

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path`` (a save of it still in flight is awaited first).

        ``weights_only`` has no effect: objects are always read through async_ckpt's
        allow-list, never with plain pickle.
        """
        if any(save.identity == identity(path) for save in self._saves):
            errors = self._finish_saves()
            if errors:
                raise errors[0]
        return load_checkpoint(path, map_location=map_location, verify=self.verify)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path`` in the background, after a save of it in flight.

        Returns at once (deleting a large file takes a while on some file
        systems): one background thread deletes, in order, once a save of that
        path still in flight has finished, so a checkpoint being written is never
        deleted. A later save or load of the path waits for the deletion; its
        error, if any, is raised at the next save or teardown. The metadata goes
        first, so an interrupted delete leaves an incomplete checkpoint, never a
        damaged one; a symbolic link (``save_last="link"``) is removed alone.
        """
        text = os.fspath(path)
        wanted = identity(text)
        saves = [save.future for save in self._saves if _covers(wanted, save.identity)]
        if self._remover is None:
            # a plain thread: a removal from an atexit handler works (async_ckpt.threads)
            self._remover = Workers(1, "async_ckpt-remove", finish_at_exit=True)
        self._removals.append((wanted, self._remover.submit(_remove, text, saves)))

    def teardown(self) -> None:
        """Await the last save and the removals (raising the first error), then close
        the checkpointer.

        Called while an exception is already propagating (Lightning tears down
        after a failed fit), a failure does not replace that exception, which
        would also cut Lightning's own teardown short: it is logged and added to
        the exception as a note.
        """
        if self._starting is not None:
            self._started()
        checkpointer, self._checkpointer = self._checkpointer, None
        remover, self._remover = self._remover, None
        handling = sys.exc_info()[1]
        try:
            errors = [*self._finish_saves(), *self._finish_removals()]
            for error in errors[1:] if handling is None else errors:
                message = f"async_ckpt: a checkpoint save or removal failed too: {error!r}"
                log.error(message)
                if handling is not None and hasattr(handling, "add_note"):  # Python 3.11+
                    handling.add_note(message)
            if errors and handling is None:
                raise errors[0]
        finally:
            if remover is not None:
                remover.shutdown()
            if checkpointer is not None:
                checkpointer.close()
