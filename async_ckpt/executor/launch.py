"""Starting a worker process, and how long an idle one gets to stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from ..settings import env_seconds

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

CLOSE_GRACE_S = 5.0
"""Default time (seconds) an idle worker gets to exit after ``close()`` told it to; then
it is killed (its own pid only). An idle worker exits at once, so only one that cannot
run (stopped with SIGSTOP, frozen, starved) waits this long, and killing it loses
nothing. Overridden by the environment variable named by :data:`CLOSE_GRACE_ENV`."""
CLOSE_GRACE_ENV = "ASYNC_CKPT_CLOSE_GRACE_S"


def close_grace() -> float:
    """The grace of :data:`CLOSE_GRACE_S`, or a valid value of :data:`CLOSE_GRACE_ENV`."""
    return env_seconds(CLOSE_GRACE_ENV, CLOSE_GRACE_S)


def worker_pythonpath() -> str:
    """The caller's import path (this package first), so the worker can unpickle
    writers from any module the caller imported, including ones found through the
    script's directory or a ``sys.path`` entry added at run time."""
    entries = [_PACKAGE_ROOT, *(os.path.abspath(p) for p in sys.path if isinstance(p, str))]
    return os.pathsep.join(dict.fromkeys(entries))


def launch_worker() -> tuple[subprocess.Popen, socket.socket]:
    """Start ``python -m async_ckpt.executor.worker``; returns it and the caller's end of
    the Unix socket connected to it."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    env["PYTHONPATH"] = worker_pythonpath()
    # ``-m`` would put the working directory first on the worker's path, ahead of the
    # caller's: another checkout of async_ckpt there would run in the worker instead.
    env["PYTHONSAFEPATH"] = "1"  # Python 3.11+; 3.10 ignores it
    proc = subprocess.Popen(
        [sys.executable, "-m", "async_ckpt.executor.worker", "--fd", str(child.fileno())],
        pass_fds=[child.fileno()],
        stdin=subprocess.DEVNULL,
        env=env,
    )
    child.close()
    return proc, parent
