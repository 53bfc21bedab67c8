"""The process executor: one persistent worker process per rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import WorkerDiedError
from . import wire
from .base import Executor, SaveJob

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class ProcessExecutor(Executor):
    """Hands staged snapshots to a worker process over a Unix socket.

    The arena file descriptors are sent once per arena generation; each save
    then costs one small message. A worker that dies fails the in-flight save
    with :class:`WorkerDiedError` (naming its exit code); the next save starts
    a fresh worker.
    """

    def __init__(self, group_spec: Any = None) -> None:
        self.group_spec = group_spec  # callable returning the workers' group spec, or None
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.RLock()
        self._pending: dict[int, SaveJob] = {}
        self._sent_generation = -1
        self._pong = threading.Event()
        self._closed = False

    # ------------------------------------------------------------ lifecycle
    @property
    def worker_pid(self) -> int | None:
        """The current worker's process id (None before the first start)."""
        return self._proc.pid if self._proc is not None else None

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._sock is not None

    def _spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "async_ckpt.executor.worker", "--fd", str(child.fileno())],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        child.close()
        self._sock = parent
        self._sent_generation = -1
        self._reader = threading.Thread(
            target=self._read_replies,
            args=(parent, self._proc),
            name="async_ckpt-replies",
            daemon=True,
        )
        self._reader.start()

    def start(self) -> None:
        with self._lock:
            if not self._alive():
                self._spawn()
            self._pong.clear()
            wire.send(self._sock, {"op": "ping"})
        self._pong.wait(timeout=120)  # the worker has imported torch and is listening

    # ------------------------------------------------------------ saves
    def submit(self, job: SaveJob) -> None:
        job.snapshot.staged.add_done_callback(lambda staged: self._send(job, staged))

    def _send(self, job: SaveJob, staged: Any) -> None:
        if staged.exception() is not None:
            job.finish(error=staged.exception())
            return
        snap = job.snapshot
        try:
            with self._lock:
                if not self._alive():
                    self._spawn()
                if self._sent_generation != job.arena_generation:
                    arenas = job.options.pop("arenas")
                    wire.send(
                        self._sock,
                        {"op": "arenas", "sizes": [a.nbytes for a in arenas]},
                        fds=[a.fd for a in arenas],
                    )
                    self._sent_generation = job.arena_generation
                job.options.pop("arenas", None)
                self._pending[job.save_no] = job
                wire.send(
                    self._sock,
                    {
                        "op": "save",
                        "save_no": job.save_no,
                        "buffer": snap.buffer_index,
                        "offsets": snap.offsets,
                        "state": snap.state,
                        "writer": job.writer,
                        "group": self.group_spec() if self.group_spec else None,
                        "options": job.options,
                    },
                )
        except (OSError, ValueError) as exc:
            self._pending.pop(job.save_no, None)
            job.finish(error=WorkerDiedError(f"could not hand the save to the worker: {exc}"))

    def _read_replies(self, sock: socket.socket, proc: subprocess.Popen) -> None:
        while True:
            try:
                received = wire.recv(sock)
            except OSError:
                received = None
            if received is None:
                break
            msg, _ = received
            if msg["op"] == "pong":
                self._pong.set()
                continue
            with self._lock:
                job = self._pending.pop(msg["save_no"], None)
            if job is None:
                continue
            if msg["op"] == "done":
                job.finish(meta=msg["metadata"], timings=msg["timings"])
            else:
                job.finish(error=msg["error"], timings=msg["timings"])
        code = proc.wait()
        with self._lock:
            if self._sock is sock:
                self._sock = None
            orphans = list(self._pending.values())
            self._pending.clear()
        for job in orphans:
            job.finish(
                error=WorkerDiedError(
                    f"the checkpoint worker (pid {proc.pid}) exited with code {code} during the "
                    f"save to {job.writer.checkpoint_id!r}; nothing was committed. The next save "
                    "starts a fresh worker (check memory limits if it was killed: code -9)."
                )
            )
        sock.close()

    def abort(self, reason: BaseException) -> None:
        with self._lock:
            jobs = list(self._pending.values())
            self._pending.clear()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # a killed worker cannot commit; its partial files are never listed
            proc.wait()
        for job in jobs:
            job.finish(error=reason)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sock, proc = self._sock, self._proc
        if sock is not None:
            try:
                wire.send(sock, {"op": "close"})
            except OSError:
                pass
        if proc is not None:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
