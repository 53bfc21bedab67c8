"""The persistent worker process: death, errors, reuse, leaks, scripts, shutdown."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch
from faulty_storage import FailingWriter, StopAtWriter, wait_reached
from helpers import wait_until

import async_ckpt
from async_ckpt import (
    AsyncCheckpointer,
    CheckpointError,
    FileSystemWriter,
    SaveFailedError,
    WorkerDiedError,
)

SCRIPTS = Path(__file__).parent / "scripts"

pytestmark = pytest.mark.multiprocess
MiB = 1 << 20


def writer(path) -> FileSystemWriter:
    return FileSystemWriter(path, sync_files=False)


def loads_as(path, expected: dict) -> None:
    got = {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in expected.items()
    }
    async_ckpt.load(got, checkpoint_id=path)
    for key, want in expected.items():
        if isinstance(want, torch.Tensor):
            assert torch.equal(got[key], want), key
        else:
            assert got[key] == want, key


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_killed_worker_fails_the_save_and_is_replaced_then_closed(tmp_path, gate):
    with AsyncCheckpointer() as ck:
        early = {"w": torch.arange(100.0), "step": 1}
        ck.save(early, storage_writer=writer(tmp_path / "early")).result(timeout=120)
        first_pid = ck.worker_pid

        held = StopAtWriter(tmp_path / "doomed", gate=gate, point="before-write")
        fut = ck.save({"w": torch.ones(1000)}, storage_writer=held)
        wait_reached(gate, "before-write")
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match=r"exited with code -9") as info:
            fut.result(timeout=60)
        assert str(first_pid) in str(info.value)
        assert isinstance(info.value, SaveFailedError)

        loads_as(tmp_path / "early", early)
        later = {"w": torch.arange(5.0), "step": 2}
        ck.save(later, storage_writer=writer(tmp_path / "later")).result(timeout=120)
        assert ck.worker_pid not in (None, first_pid)
        assert gone(first_pid)
        pending = ck.save(later, storage_writer=writer(tmp_path / "at-exit"))
    # Leaving the block closed it: the pending save finished, the worker is gone.
    assert pending.done() and gone(ck.worker_pid)
    loads_as(tmp_path / "at-exit", later)
    ck.close()  # closing again is harmless
    with pytest.raises(CheckpointError, match="closed"):
        ck.save(later, storage_writer=writer(tmp_path / "closed"))
    loads_as(tmp_path / "later", later)
    with pytest.raises(async_ckpt.IncompleteCheckpointError):
        async_ckpt.load({"w": torch.zeros(1000)}, checkpoint_id=tmp_path / "doomed")


def test_error_in_the_worker_keeps_its_type_and_message(ckpt, tmp_path):
    pid = ckpt.worker_pid
    fut = ckpt.save({"w": torch.ones(10)}, storage_writer=FailingWriter(tmp_path / "fire"))
    with pytest.raises(OSError, match="disk on fire"):
        fut.result(timeout=60)
    sd = {"w": torch.full((10,), 4.0)}
    ckpt.save(sd, storage_writer=writer(tmp_path / "fine")).result(timeout=60)
    assert ckpt.worker_pid == pid  # an error is not a crash
    loads_as(tmp_path / "fine", sd)


def test_writer_the_worker_cannot_import_fails_only_that_save(ckpt, tmp_path):
    class LocalWriter(FileSystemWriter):  # not importable by anyone: pickling refuses
        pass

    fut = ckpt.save({"w": torch.ones(10)}, storage_writer=LocalWriter(tmp_path / "x"))
    with pytest.raises(SaveFailedError, match="cannot be pickled"):
        fut.result(timeout=60)
    ckpt.save({"w": torch.ones(10)}, storage_writer=writer(tmp_path / "y")).result(timeout=60)


def test_writer_class_from_main_fails_only_that_save(ckpt, tmp_path, monkeypatch):
    # As when a training script defines its writer: it pickles by reference to
    # __main__, which in the worker is the worker's own module.
    class MainWriter(FileSystemWriter):
        pass

    MainWriter.__module__, MainWriter.__qualname__ = "__main__", "MainWriterOfTheScript"
    monkeypatch.setattr(sys.modules["__main__"], "MainWriterOfTheScript", MainWriter, raising=False)
    pid = ckpt.worker_pid
    fut = ckpt.save({"w": torch.ones(10)}, storage_writer=MainWriter(tmp_path / "x"))
    with pytest.raises(SaveFailedError, match="cannot load the storage writer"):
        fut.result(timeout=60)
    ckpt.save({"w": torch.ones(10)}, storage_writer=writer(tmp_path / "y")).result(timeout=60)
    assert ckpt.worker_pid == pid


def test_a_worker_that_cannot_start_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", shutil.which("false") or "/bin/false")
    ck = AsyncCheckpointer()
    # start() waits for the worker's answer, up to a 120 s start-up allowance; a worker
    # that dies must wake it at once. Record how each wait ended rather than timing it.
    woken: list[bool] = []

    class RecordingEvent(threading.Event):
        def wait(self, timeout=None):
            woken.append(super().wait(timeout))
            return woken[-1]

    monkeypatch.setattr(ck._ensure_executor(), "_pong", RecordingEvent())
    try:
        with pytest.raises(WorkerDiedError, match="while starting"):
            ck.start()
        assert woken == [True], "start() waited out its allowance instead of being woken"
        fut = ck.save({"w": torch.ones(3)}, storage_writer=writer(tmp_path / "x"))
        with pytest.raises(WorkerDiedError, match="worker"):
            fut.result(timeout=60)
    finally:
        monkeypatch.undo()
        ck.close()


def test_one_worker_serves_many_saves_without_leaking(ckpt, tmp_path):
    sd = {f"w{i}": torch.randn(MiB) for i in range(8)}  # 32 MiB
    sd["step"] = 0
    me = psutil.Process()
    pids, fds, rss = set(), {}, {}
    for n in range(1, 21):
        sd["step"] = n
        for i in range(8):
            sd[f"w{i}"].add_(1)
        ckpt.save(sd, storage_writer=writer(tmp_path / f"s{n % 3}")).result(timeout=60)
        pids.add(ckpt.worker_pid)
        if n in (5, 20):
            gc.collect()
            worker = psutil.Process(ckpt.worker_pid)
            fds[n] = (me.num_fds(), worker.num_fds())
            rss[n] = (me.memory_info().rss, worker.memory_info().rss)
    assert len(pids) == 1
    assert fds[20][0] - fds[5][0] <= 2 and fds[20][1] - fds[5][1] <= 2, fds
    for side in (0, 1):
        growth = rss[20][side] - rss[5][side]
        assert growth < 24 * MiB, (
            f"{'caller' if side == 0 else 'worker'} RSS grew {growth / MiB:.0f} MiB"
        )
    loads_as(tmp_path / "s2", {k: v for k, v in sd.items()})


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    """One run of scripts/no_main_guard.py: no main guard, exits without close()."""
    root = tmp_path_factory.mktemp("script")
    ids = [root / "committed", root / "pending", root / "dropped"]
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "no_main_guard.py"), *map(str, ids)],
        capture_output=True,
        text=True,
        timeout=240,  # only against a hang: a loaded machine is slow to start three pythons
    )
    return out, ids


def test_script_without_main_guard_saves(script_run):
    out, (committed, _, _) = script_run
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("script body runs") == 1  # the worker did not re-run it
    loads_as(committed, {"w": torch.arange(1000, dtype=torch.float32), "step": 7})


def test_exit_without_close_is_prompt_and_leaves_no_worker(script_run):
    # "Prompt": the script exits by itself (the fixture's timeout is only a hang guard;
    # how long it took depends on the machine's load, so it is not checked).
    out, (_, pending, dropped) = script_run
    assert out.returncode == 0, out.stderr
    pids = [int(line) for line in out.stdout.split()[-2:]]
    for pid in pids:
        wait_until(lambda pid=pid: gone(pid), 120, f"worker {pid} did not exit with its caller")
    # The save still in flight at exit was finished by the exit hook.
    loads_as(pending, {"w": torch.arange(1 << 20, dtype=torch.float32)})
    loads_as(dropped, {"w": torch.ones(100)})


def test_the_worker_answers_typed_messages_and_refuses_a_save_of_an_unknown_structure():
    """The worker side of the protocol, in-process: ping, and a save whose structure it lacks."""
    from async_ckpt.executor import protocol, wire
    from async_ckpt.executor.worker import serve
    from async_ckpt.staging.snapshot import WavePlace

    caller, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = threading.Thread(target=serve, args=(worker,), daemon=True)
    server.start()
    try:
        wire.send(caller, protocol.Ping())
        pong, _ = wire.recv(caller)
        assert pong == protocol.Pong(os.getpid())
        save = protocol.Save(
            save_no=1,
            structure=7,
            values={},
            objects=[],
            fingerprints=None,
            writer=b"",
            group=None,
            waves=1,
            first=WavePlace(0, [], 0, []),
        )
        wire.send(caller, save)
        reply, _ = wire.recv(caller)
        assert isinstance(reply, protocol.Failed) and reply.save_no == 1
        assert "structure 7" in str(reply.error)
        wire.send(caller, protocol.Close())
        server.join(timeout=60)
        assert not server.is_alive()
    finally:
        caller.close()
        worker.close()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH needs Python 3.11")
def test_the_worker_imports_the_callers_package_not_one_in_the_working_directory(
    tmp_path, monkeypatch
):
    impostor = tmp_path / "cwd" / "async_ckpt"
    impostor.mkdir(parents=True)
    (impostor / "__init__.py").write_text("raise ImportError('the wrong async_ckpt')\n")
    monkeypatch.chdir(impostor.parent)
    state = {"w": torch.arange(4.0)}
    with AsyncCheckpointer(executor="process") as ck:
        ck.save(state, checkpoint_id=str(tmp_path / "ckpt")).result(timeout=120)
    loaded = {"w": torch.zeros(4)}
    async_ckpt.load(loaded, checkpoint_id=str(tmp_path / "ckpt"))
    assert torch.equal(loaded["w"], state["w"])


_ORPHAN = """
import sys, threading
from async_ckpt.executor.worker import exit_if_orphaned
with exit_if_orphaned():
    print("ready", flush=True)
    threading.Event().wait()  # as joining a group whose ranks are gone
"""

_CALLER = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
os._exit(0)  # the caller dies without a word, as a killed training process does
"""


def test_a_worker_blocked_joining_its_group_exits_when_its_caller_dies() -> None:
    import select

    out = subprocess.run(
        [sys.executable, "-c", _CALLER, _ORPHAN], capture_output=True, text=True, timeout=120
    )
    pid = int(out.stdout.split()[0])
    try:
        exited = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    try:
        ready, _, _ = select.select([exited], [], [], 60)  # readable once it has exited
    finally:
        os.close(exited)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    assert ready, "the orphaned worker was still waiting a minute after its caller died"
