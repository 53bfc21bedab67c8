"""The persistent worker process: ``python -m async_ckpt.executor.worker --fd N``.

Started as its own interpreter (never by re-importing the user's main
module), once per rank. It maps the staging arenas once, then per save
receives a small message, runs plan -> validate -> write -> commit from the
arena, and reports back. It runs at lower CPU and I/O priority than training.
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

from ..dist.comm import Comm, LocalComm
from ..dist.group import connect_group
from ..errors import SaveFailedError
from ..pipeline.save import SaveTimings, WaveData, run_save
from ..planning.plan import Planner
from ..staging.arena import Arena
from ..staging.snapshot import item_views
from . import wire


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


def _receive_waves(
    sock: socket.socket, msg: dict[str, Any], arenas: dict[int, Arena], closing: threading.Event
) -> Iterator[WaveData]:
    """The save's waves: the first came with it, the rest arrive as they are staged."""
    state, save_no = msg["state"], msg["save_no"]

    def wave_data(wave: dict[str, Any]) -> WaveData:
        sources = item_views(arenas[wave["buffer"]], state, wave["items"], wave["offsets"])

        def written(ok: bool) -> None:
            done = {"op": "wave_done", "save_no": save_no, "wave": wave["index"], "ok": ok}
            try:
                wire.send(sock, done)
            except OSError:
                pass  # the caller has gone; a fully staged save still commits

        return WaveData(wave["items"], sources, written)

    yield wave_data(msg["wave"])
    for _ in range(1, msg["waves"]):
        while True:
            received = wire.recv(sock)
            if received is None:
                raise SaveFailedError("the caller went away while the save was being staged")
            nxt, _ = received
            if nxt["op"] == "ping":
                wire.send(sock, {"op": "pong", "pid": os.getpid()})
                continue
            if nxt["op"] == "close":
                closing.set()
                raise SaveFailedError("the caller closed while this save was still being staged")
            if nxt["op"] != "wave" or nxt["save_no"] != save_no:
                raise SaveFailedError(
                    f"protocol error: expected a wave of save {save_no}, got {nxt}"
                )
            break
        if "error" in nxt:
            raise nxt["error"]
        yield wave_data(nxt["wave"])


def serve(sock: socket.socket) -> None:
    """Handle messages until the caller closes the connection."""
    arenas: dict[int, Arena] = {}
    planner = Planner()
    comm: Comm | None = None
    closing = threading.Event()
    while True:
        received = wire.recv(sock)
        if received is None:
            break
        msg, fds = received
        op = msg["op"]
        if op == "arenas":
            for arena in arenas.values():
                arena.close()
            arenas = {
                i: Arena.attach(fd, n)
                for i, (fd, n) in enumerate(zip(fds, msg["sizes"], strict=True))
            }
            continue
        if op == "close":
            break
        if op == "ping":
            wire.send(sock, {"op": "pong", "pid": os.getpid()})
            continue
        if op == "wave":
            continue  # a wave of a save that has already failed: its buffers went back
        timings = SaveTimings()
        try:
            writer = _load_writer(msg["writer"])
            if comm is None:
                comm = connect_group(msg["group"]) if msg["group"] else LocalComm()
            waves = _receive_waves(sock, msg, arenas, closing)
            meta = run_save(
                msg["state"],
                None,
                writer,
                comm,
                planner,
                waves=waves,
                timings=timings,
                **msg["options"],
            )
            del waves
            reply = {"op": "done", "save_no": msg["save_no"], "metadata": meta, "timings": timings}
        except Exception as exc:
            reply = {
                "op": "error",
                "save_no": msg["save_no"],
                "error": _portable_error(exc),
                "timings": timings,
            }
        try:
            wire.send(sock, reply)
        except OSError:
            break  # the caller has gone (exited or killed): nobody is waiting for replies
        if closing.is_set():  # "close" came in the middle of that save's waves
            break
    for arena in arenas.values():
        arena.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="connected Unix socket to the caller")
    args = parser.parse_args(argv)
    lower_priority()
    sock = socket.socket(fileno=args.fd)
    try:
        serve(sock)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
