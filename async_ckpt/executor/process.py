"""The process executor: one persistent worker process per rank."""

from __future__ import annotations

import itertools
import logging
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import wait as wait_futures
from typing import Any

from ..dist.group import WorkerGroup
from ..errors import CheckpointError, SaveFailedError, WorkerDiedError
from ..staging.snapshot import Snapshot, Wave
from ..state.model import LocalState
from ..storage.base import StorageWriter
from . import wire
from .base import Executor, ExecutorSetup, SaveJob
from .launch import CLOSE_GRACE_ENV, close_grace, launch_worker
from .protocol import (
    Arenas,
    Close,
    Done,
    Failed,
    Ping,
    Pong,
    Save,
    Structure,
    WaveStaged,
    WaveWritten,
)

log = logging.getLogger("async_ckpt")
CLOSE_IN_FLIGHT_WAIT_S = 60.0
"""How long ``close()`` waits for saves the worker still has in flight before it kills
the worker anyway (``AsyncCheckpointer.close`` waits for its last save before this)."""


class ProcessExecutor(Executor):
    """Hands staged snapshots to a worker process over a Unix socket.

    The arena file descriptors are sent once per arena generation and the
    state's structure once per structure (see :mod:`.protocol`); each save
    then costs one small message. A worker that dies fails the in-flight save
    with :class:`WorkerDiedError` (naming its exit code); the next save starts
    a fresh worker.

    ``close()`` sends what is queued, lets the worker finish the saves it has
    in flight (up to :data:`CLOSE_IN_FLIGHT_WAIT_S`), tells it to stop and then
    gives it :data:`CLOSE_GRACE_S` seconds (environment variable
    ``ASYNC_CKPT_CLOSE_GRACE_S``) to exit before killing it, so a stopped or
    frozen idle worker cannot hold up interpreter exit.
    """

    def __init__(self, group: WorkerGroup | None = None) -> None:
        self.group = group  # where the workers of all ranks meet; None on one rank
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.RLock()
        # Sent, not yet answered: save_no -> (job, the worker it was sent to).
        self._pending: dict[int, tuple[SaveJob, subprocess.Popen]] = {}
        self._unsent: dict[int, SaveJob] = {}  # submitted, still staging
        # What the current worker holds: the arenas' generation and the state structure.
        self._arena_generation = -1
        self._structure: Structure | None = None
        self._generations = itertools.count()
        self._pong = threading.Event()
        self._closed = False
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # (send function, args)
        self._outbox_lock = threading.Lock()
        self._outbox_closed = False
        self._sender: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, setup: ExecutorSetup) -> ProcessExecutor:
        # The group's address is shared over the training group: a collective, run here.
        group = WorkerGroup(setup.process_group, setup.group_timeout) if setup.distributed else None
        return cls(group)

    @classmethod
    def check_writer(cls, writer: StorageWriter) -> None:
        if not writer.visible_across_processes:
            raise CheckpointError(
                f"cannot save {writer.checkpoint_id!r} from a worker process: memory:// lives "
                "inside one process, so the worker's copy would be invisible here. Use "
                "AsyncCheckpointer(executor='thread') for memory:// checkpoints."
            )

    def restart_after_failure(self) -> None:
        if self.group is not None:
            # Every rank saw that save fail: all restart their workers into a new group.
            self.group.next_epoch()
            self.abort(CheckpointError("restarting the worker after a failed save"))

    @property
    def worker_pid(self) -> int | None:
        """The current worker's process id (None before the first start)."""
        return self._proc.pid if self._proc is not None else None

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._sock is not None

    def _spawn(self) -> None:
        self._proc, parent = launch_worker()
        self._sock = parent
        self._arena_generation = -1
        self._structure = None
        self._reader = threading.Thread(
            target=self._read_replies,
            args=(parent, self._proc),
            name="async_ckpt-replies",
            daemon=True,
        )
        self._reader.start()

    def start(self) -> None:
        with self._lock:
            # Cleared before the spawn: a worker that dies at once makes the reader set
            # it immediately, and clearing after that would wait out the whole allowance.
            self._pong.clear()
            if not self._alive():
                self._spawn()
            proc = self._proc
            try:
                wire.send(self._sock, Ping())
            except OSError:
                pass  # it is gone already; the reader sees EOF and wakes us
        self._pong.wait(timeout=120)  # the worker has imported torch and is listening
        if proc.poll() is not None:  # woken by the reader at EOF: it died starting up
            raise WorkerDiedError(
                f"the checkpoint worker (pid {proc.pid}) exited with code {proc.returncode} "
                f"while starting; run `{sys.executable} -m async_ckpt.executor.worker --help` "
                "to see why it cannot start"
            )

    # ------------------------------------------------------------ saves
    def submit(self, job: SaveJob) -> None:
        with self._lock:
            self._unsent[job.save_no] = job
        first, *rest = job.snapshot.waves
        first.staged.add_done_callback(lambda staged: self._post(self._send, job, staged))
        for wave in rest:
            wave.staged.add_done_callback(
                lambda staged, w=wave: self._post(self._send_wave, job, w, staged)
            )

    def _post(self, send: Any, job: SaveJob, *args: Any) -> None:
        """Send from the outbox thread, in order: a synchronous save's caller (on whose
        thread "staged" resolves) then does not wait for the pickling and the socket.

        Its own lock, not the executor's: the sender holds that one while it sends.
        """
        with self._outbox_lock:
            if self._outbox_closed:  # close() came first: this save cannot reach a worker
                with self._lock:
                    self._unsent.pop(job.save_no, None)
                    self._pending.pop(job.save_no, None)
                job.finish(error=CheckpointError("the checkpointer was closed during this save"))
                return
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_loop, name="async_ckpt-send", daemon=True
                )
                self._sender.start()
            self._outbox.put((send, (job, *args)))

    def _send_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            send, args = item
            try:
                send(*args)
            except Exception:  # never lose the thread: later saves queue behind it
                log.exception("async_ckpt: handing a save to the worker failed")
            del item, send, args  # do not keep the last job alive until the next save

    def _send_wave(self, job: SaveJob, wave: Wave, staged: Future) -> None:
        """Tell the worker a later wave is staged (or that staging failed, ending the save)."""
        if staged.exception() is not None:
            error = SaveFailedError(f"staging failed: {staged.exception()!r}")
            message = WaveStaged(job.save_no, error=error)
        else:
            message = WaveStaged(job.save_no, place=wave.place)
        with self._lock:
            if self._pending.get(job.save_no, (None, None))[1] is not self._proc:
                return  # the save has ended (or its worker died): nobody waits for this wave
            try:
                wire.send(self._sock, message)
            except (OSError, ValueError, AttributeError):
                pass  # the reader sees the worker go and fails the save

    def _send(self, job: SaveJob, staged: Future) -> None:
        if staged.exception() is not None:
            with self._lock:
                self._unsent.pop(job.save_no, None)
            job.finish(error=staged.exception())
            return
        snap = job.snapshot
        try:
            # Pickled apart from the message so that a writer the worker cannot
            # import fails this save with a clear error instead of killing the worker.
            writer = pickle.dumps(job.writer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            with self._lock:
                self._unsent.pop(job.save_no, None)
            job.finish(
                error=SaveFailedError(
                    f"the storage writer {type(job.writer).__qualname__} for "
                    f"{job.writer.checkpoint_id!r} cannot be pickled for the worker process "
                    f"({type(exc).__name__}: {exc}); make it picklable or use executor='thread'"
                )
            )
            return
        try:
            with self._lock:  # held from _unsent to _pending, so abort() always sees the job
                self._unsent.pop(job.save_no, None)
                if job.aborted.is_set():  # cancelled or timed out while staging
                    job.finish(error=CancelledError("aborted before it reached the worker"))
                    return
                if not self._alive():
                    self._spawn()
                self._send_arenas(snap)
                structure = self._send_structure(snap.state)
                self._pending[job.save_no] = (job, self._proc)
                wire.send(
                    self._sock,
                    Save(
                        save_no=job.save_no,
                        structure=structure.generation,
                        values=snap.state.values,
                        objects=snap.state.objects,
                        fingerprints=snap.state.known_fingerprints,
                        writer=writer,
                        group=self.group.spec() if self.group is not None else None,
                        waves=len(snap.waves),
                        first=snap.waves[0].place,
                        extra=job.extra,
                        incremental=job.incremental,
                    ),
                )
        except (OSError, ValueError) as exc:
            with self._lock:
                self._pending.pop(job.save_no, None)
            job.finish(error=WorkerDiedError(f"could not hand the save to the worker: {exc}"))
        except Exception as exc:  # never let it escape: this runs as a future callback
            with self._lock:
                self._pending.pop(job.save_no, None)
            job.finish(error=exc)

    def _send_arenas(self, snap: Snapshot) -> None:
        """Hand the worker the snapshot's arenas unless it holds that generation already."""
        if self._arena_generation != snap.arena_generation:
            arenas = snap.arenas
            wire.send(self._sock, Arenas([a.nbytes for a in arenas]), fds=[a.fd for a in arenas])
            self._arena_generation = snap.arena_generation

    def _send_structure(self, state: LocalState) -> Structure:
        """The worker's structure for ``state``; sent first unless it holds that one already."""
        if self._structure is None or not self._structure.describes(state):
            structure = Structure.of(state, next(self._generations))
            wire.send(self._sock, structure)
            self._structure = structure
        return self._structure

    def _read_replies(self, sock: socket.socket, proc: subprocess.Popen) -> None:
        while True:
            try:
                received = wire.recv(sock)
            except OSError:
                received = None
            if received is None:
                break
            msg, _ = received
            if isinstance(msg, Pong):
                self._pong.set()
                continue
            if isinstance(msg, WaveWritten):
                with self._lock:
                    job, _ = self._pending.get(msg.save_no, (None, None))
                if job is not None:
                    job.snapshot.wave_written(msg.wave, msg.ok)
                continue
            if isinstance(msg, Done | Failed):
                with self._lock:
                    job, _ = self._pending.pop(msg.save_no, (None, None))
                if job is None:
                    continue
                if isinstance(msg, Done):
                    job.finish(meta=msg.metadata, timings=msg.timings)
                else:
                    job.finish(error=msg.error, timings=msg.timings)
                continue
            log.error("async_ckpt: the worker sent an unknown message %r", msg)
        code = proc.wait()
        self._pong.set()  # a start() waiting for this worker must not wait in vain
        with self._lock:
            if self._sock is sock:
                self._sock = None
            # Only this worker's saves: a replacement may already hold newer ones.
            orphans = [job for job, p in self._pending.values() if p is proc]
            for job in orphans:
                del self._pending[job.save_no]
        for job in orphans:
            job.finish(
                error=WorkerDiedError(
                    f"the checkpoint worker (pid {proc.pid}) exited with code {code} during the "
                    f"save to {job.writer.checkpoint_id!r}; nothing was committed. The next save "
                    "starts a fresh worker (check memory limits if it was killed: code -9)."
                )
            )
        sock.close()

    def abort(self, reason: BaseException, save_no: int | None = None) -> None:
        with self._lock:
            sent = [job for job, _ in self._pending.values()]
            self._pending.clear()
            proc = self._proc
            staging = [
                job for job in self._unsent.values() if save_no is None or job.save_no == save_no
            ]
            for job in staging:  # under the lock: _send checks the flag under it
                job.aborted.set()
        for job in staging:
            # Its copy may still be writing the buffer: fail the future now; _send
            # releases the buffer once staging is over.
            job.future._set_exception(reason)
        if not sent:
            return
        if proc is not None and proc.poll() is None:
            proc.kill()  # a killed worker cannot commit; its partial files are never listed
            proc.wait()
        for job in sent:
            if save_no is None or job.save_no == save_no:
                job.finish(error=reason)
            else:  # queued behind the stopped save in the same worker
                job.finish(
                    error=SaveFailedError(
                        f"save to {job.writer.checkpoint_id!r} was stopped together with save "
                        f"#{save_no} ({reason}); nothing was committed"
                    )
                )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with self._outbox_lock:  # what is queued is sent before the worker is told to stop
            self._outbox_closed = True
            sender = self._sender
            self._outbox.put(None)
        if sender is not None:
            sender.join(timeout=60)
        with self._lock:
            sock, proc = self._sock, self._proc
        if sock is not None:
            try:
                wire.send(sock, Close())
            except OSError:
                pass
        if proc is not None:
            self._stop_worker(proc)
        if self._reader is not None:
            self._reader.join(timeout=10)

    def _stop_worker(self, proc: subprocess.Popen) -> None:
        """Wait for ``proc``, told to close, to exit; kill it (only it) if it does not.

        Saves it still has in flight get up to :data:`CLOSE_IN_FLIGHT_WAIT_S` to
        finish (its replies resolve them; its death fails them), then the idle
        worker gets the close grace: a worker that is stopped or frozen while
        idle must not hold up ``close()`` and interpreter exit for long.
        """
        with self._lock:
            in_flight = [job.future._done for job, p in self._pending.values() if p is proc]
        if in_flight:
            wait_futures(in_flight, timeout=CLOSE_IN_FLIGHT_WAIT_S)
        grace = close_grace()
        started = time.monotonic()
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
        with self._lock:
            busy = sum(1 for _, p in self._pending.values() if p is proc)
        log.warning(
            "the checkpoint worker (pid %d) did not exit within %.3g s of close()%s; killing it",
            proc.pid,
            time.monotonic() - started,
            f" with {busy} save(s) unfinished" if busy else f" ({CLOSE_GRACE_ENV}={grace:g})",
        )
        proc.kill()  # SIGKILL to this pid alone; it ends a stopped process too
        proc.wait()
