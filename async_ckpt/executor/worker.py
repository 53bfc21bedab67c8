"""The persistent worker process: ``python -m async_ckpt.executor.worker --fd N``.

Started as its own interpreter (never by re-importing the user's main
module), once per rank. It maps the staging arenas and takes the state's
structure once (see :mod:`.protocol`), then per save receives a small
message, runs plan -> validate -> write -> commit from the arena, and
reports back. It runs at lower CPU and I/O priority than training.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Iterator
from functools import partial
from typing import Any

from ..dist.arrival import check_in
from ..dist.comm import Comm, LocalComm
from ..dist.group import connect_group
from ..errors import SaveFailedError
from ..gc_pause import gc_paused
from ..pipeline.save import SaveTimings, run_save
from ..pipeline.waves import staged_waves
from ..planning.plan import Planner
from ..staging.arena import Arena
from ..staging.snapshot import WavePlace
from . import wire
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

ORPHAN_CHECK_S = 0.5


_caller_pid: int | None = None  # the caller's pid, taken first thing in main()


@contextlib.contextmanager
def exit_if_orphaned(parent: int | None = None) -> Iterator[None]:
    """Exit this process if the caller (``parent``, default the parent process now) dies
    while the block runs.

    For joining the ranks' group: it blocks in a TCPStore connect for up to the
    group's timeout (10 minutes), and a caller killed meanwhile (its whole job,
    usually) would leave this worker waiting there, holding the job's output
    open. Elsewhere the worker notices a dead caller by its socket's EOF, and a
    save already under way is finished first."""
    parent = os.getppid() if parent is None else parent
    done = threading.Event()

    def watch() -> None:
        while not done.wait(ORPHAN_CHECK_S):
            if os.getppid() != parent:  # re-parented: the caller is gone
                os._exit(3)

    watcher = threading.Thread(target=watch, name="async_ckpt-orphan-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


def lower_priority() -> None:
    """Yield CPU and disk to training where the OS allows it."""
    try:
        os.nice(10)
    except OSError:
        pass
    try:
        import psutil

        psutil.Process().ionice(psutil.IOPRIO_CLASS_BE, 7)
    except (ImportError, AttributeError, OSError, ValueError):
        pass


def _portable_error(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a SaveFailedError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return SaveFailedError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def _load_writer(payload: bytes) -> Any:
    try:
        return pickle.loads(payload)
    except Exception as exc:
        raise SaveFailedError(
            f"the checkpoint worker cannot load the storage writer ({type(exc).__name__}: "
            f"{exc}); define its class in a module the training script imports (not in "
            "__main__), or use executor='thread'"
        ) from exc


def _received_places(
    sock: socket.socket, save: Save, closing: threading.Event
) -> Iterator[WavePlace]:
    """Where the save's waves sit: the first came with it, the rest arrive as they are staged."""
    yield save.first
    for _ in range(1, save.waves):
        while True:
            received = wire.recv(sock)
            if received is None:
                raise SaveFailedError("the caller went away while the save was being staged")
            msg, _ = received
            if isinstance(msg, Ping):
                wire.send(sock, Pong(os.getpid()))
                continue
            if isinstance(msg, Close):
                closing.set()
                raise SaveFailedError("the caller closed while this save was still being staged")
            if not isinstance(msg, WaveStaged) or msg.save_no != save.save_no:
                raise SaveFailedError(
                    f"protocol error: expected a wave of save {save.save_no}, got {msg!r}"
                )
            break
        if msg.error is not None:
            raise msg.error
        yield msg.place


class _Worker:
    """The worker's side of the protocol: what it holds between saves, and one save."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.arenas: list[Arena] = []
        self.structure: Structure | None = None
        self.planner = Planner()
        self.comm: Comm | None = None
        self.closing = threading.Event()  # "close" came in the middle of a save's waves

    def map_arenas(self, msg: Arenas, fds: list[int]) -> None:
        self.close_arenas()
        self.arenas = [Arena.attach(fd, n) for fd, n in zip(fds, msg.sizes, strict=True)]

    def close_arenas(self) -> None:
        for arena in self.arenas:
            arena.close()
        self.arenas = []

    def report_written(self, save_no: int, wave: int, ok: bool) -> None:
        try:
            wire.send(self.sock, WaveWritten(save_no, wave, ok))
        except OSError:
            pass  # the caller has gone; a fully staged save still commits

    def save(self, save: Save) -> Done | Failed:
        timings = SaveTimings()
        try:
            if self.structure is None or self.structure.generation != save.structure:
                raise SaveFailedError(
                    f"protocol error: save {save.save_no} is of structure {save.structure}, "
                    f"the worker holds {self.structure and self.structure.generation}"
                )
            writer = _load_writer(save.writer)
            if self.comm is None:
                with exit_if_orphaned(_caller_pid):
                    self.comm = connect_group(save.group) if save.group else LocalComm()
            # bounded: a save that some ranks never make fails, naming them
            check_in(self.comm, f"save {save.save_no} (AsyncCheckpointer.save / async_save)")
            state = self.structure.state(save)
            places = _received_places(self.sock, save, self.closing)
            written = partial(self.report_written, save.save_no)
            waves = staged_waves(state, self.arenas, places, written)
            with gc_paused():  # the worker makes no cycles; a big state's saves make many objects
                meta = run_save(
                    state,
                    waves,
                    writer,
                    self.comm,
                    self.planner,
                    timings=timings,
                    extra=save.extra,
                    incremental=save.incremental,
                )
            return Done(save.save_no, meta, timings)
        except Exception as exc:
            return Failed(save.save_no, _portable_error(exc), timings)


def serve(sock: socket.socket) -> None:
    """Handle messages until the caller closes the connection."""
    worker = _Worker(sock)
    while True:
        received = wire.recv(sock)
        if received is None:
            break
        msg, fds = received
        if isinstance(msg, Close):
            break
        if isinstance(msg, Ping):
            wire.send(sock, Pong(os.getpid()))
        elif isinstance(msg, Arenas):
            worker.map_arenas(msg, fds)
        elif isinstance(msg, Structure):
            worker.structure = msg
        elif isinstance(msg, Save):
            try:
                wire.send(sock, worker.save(msg))
            except OSError:
                break  # the caller has gone (exited or killed): nobody is waiting for replies
            if worker.closing.is_set():
                break
        # A WaveStaged here belongs to a save that has already failed: its buffers went back.
    worker.close_arenas()


def main(argv: list[str] | None = None) -> int:
    global _caller_pid
    _caller_pid = os.getppid()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="connected Unix socket to the caller")
    args = parser.parse_args(argv)
    # The caller decides when this process ends (Close, or EOF once the caller is gone;
    # it kills with SIGKILL). A SIGTERM or Ctrl-C sent to the whole process group, as
    # schedulers do on preemption, must not kill the save the caller still waits for.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lower_priority()
    sock = socket.socket(fileno=args.fd)
    try:
        serve(sock)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    code = main()
    # Nothing is left to clean up (data files are durable, arenas unmapped, the caller
    # has its replies): skip the interpreter's teardown of torch, which made every
    # close() wait about half a second for the worker to exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
