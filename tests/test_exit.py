"""Saves and loads at interpreter exit.

Once the main thread ends, Python's thread pools refuse new work before the
``atexit`` handlers run. A save or load made from such a handler, or a save
still in flight when ``AsyncCheckpointer`` closes at exit, must still work:
the library runs that work on plain threads (``async_ckpt.threads``).

The first tests exit for real, in a child interpreter; the others set the
pools' "shutting down" flag in this process, for the paths a save takes
after exit began.
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from helpers import exit_code_of_a_forked_child, run_python

import async_ckpt as ac
from async_ckpt.storage.local import FileSystemWriter

TESTS = Path(__file__).parent
WAIT_S = 120.0  # only bounds a broken test: the suite must pass on a busy machine

_AT_EXIT = textwrap.dedent(
    """
    import atexit, sys, threading, torch, async_ckpt as ac

    path, what, no_threads = sys.argv[1], sys.argv[2], sys.argv[3] == "no-threads"
    state = {f"w{i}": torch.randn(300_000) for i in range(12)}  # several files, reader jobs
    if what == "load":
        ac.save(state, checkpoint_id=path, no_dist=True)
    else:
        executor, staging = what.split("-")
        stager = ac.Stager(async_staging=staging == "async", num_buffers=1)
        ckpt = ac.AsyncCheckpointer(executor=executor, stager=stager, no_dist=True)
        ckpt.save(state, checkpoint_id=path + ".first").result()  # async staging: the 2nd save

    def at_exit():
        if no_threads:  # as on Python 3.12.0-3.12.2: no thread starts at exit
            def refuse(self):
                raise RuntimeError("can't create new thread at interpreter shutdown")

            threading.Thread.start = refuse
        if what != "load":
            ckpt.save(state, checkpoint_id=path).result()
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        ac.load(target, checkpoint_id=path, no_dist=True)
        same = all(torch.equal(target[k], state[k]) for k in state)
        print("loaded equal" if same else "loaded different", flush=True)

    atexit.register(at_exit)
    """
)


@pytest.mark.parametrize("threads", ["threads", "no-threads"])
@pytest.mark.parametrize("what", ["load", "thread-sync", "thread-async", "process-sync"])
def test_a_save_and_a_load_in_an_atexit_handler_work(tmp_path, what, threads):
    """Before: "cannot schedule new futures after interpreter shutdown" from the load's
    readers and the thread executor (whose save then also held its buffer for good).
    ``no-threads``: as on Python 3.12.0-3.12.2, where no thread starts at exit,
    the work runs on the threads already started or on the handler's own."""
    assert run_python(_AT_EXIT, str(tmp_path / "c"), what, threads) == "loaded equal"


_IN_FLIGHT = textwrap.dedent(
    """
    import atexit, os, sys, threading, torch, async_ckpt as ac
    from faulty_storage import StopAtWriter

    path, gate = sys.argv[1], sys.argv[2]
    state = {f"w{i}": torch.arange(300_000.0) + i for i in range(12)}
    ckpt = ac.AsyncCheckpointer(executor="thread", no_dist=True)
    future = ckpt.save(state, storage_writer=StopAtWriter(path, gate=gate, point="before-write"))
    # When the main thread ends: this opens the gate (registered after async_ckpt's own
    # wait for saves in flight, so it runs first); the atexit handler then looks.
    threading._register_atexit(lambda: open(os.path.join(gate, "release"), "w").close())
    atexit.register(lambda: print("committed" if future.done() else "in flight", flush=True))
    """
)


def test_a_save_in_flight_when_the_main_thread_ends_commits_before_atexit_handlers(tmp_path):
    """As Python waits for a thread pool's work: the save commits while threads can
    still start (on most Python versions) and before other
    handlers (``destroy_process_group``, say) run."""
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    assert run_python(_IN_FLIGHT, str(tmp_path / "c"), str(gate), env=env) == "committed"
    target = {f"w{i}": torch.zeros(300_000) for i in range(12)}
    ac.load(target, checkpoint_id=tmp_path / "c", no_dist=True)
    assert all(torch.equal(target[f"w{i}"], torch.arange(300_000.0) + i) for i in range(12))


def test_a_save_whose_hand_off_fails_gives_its_buffer_back(tmp_path, monkeypatch):
    """The save raises, its future fails, and the next save gets the (only) buffer."""
    state = {"w": torch.randn(64, 64)}
    real_start = threading.Thread.start
    refused = []

    def no_save_thread(self):
        if self.name.startswith("async_ckpt-save") and not refused:
            refused.append(self.name)
            raise RuntimeError("can't start new thread")
        real_start(self)

    with ac.AsyncCheckpointer(
        executor="thread", no_dist=True, stager=ac.Stager(num_buffers=1)
    ) as ck:
        monkeypatch.setattr(threading.Thread, "start", no_save_thread)
        with pytest.raises(RuntimeError, match="no async_ckpt-save thread can start"):
            ck.save(state, checkpoint_id=tmp_path / "a")
        monkeypatch.undo()
        assert refused
        failed = ck._last  # the failed save's future, as close() would wait for it
        assert failed is not None and isinstance(failed.exception(timeout=0), RuntimeError)
        finished = threading.Event()
        outcome = []

        def second_save():
            outcome.append(ck.save(state, checkpoint_id=tmp_path / "b").result())
            finished.set()

        threading.Thread(target=second_save, daemon=True).start()
        assert finished.wait(WAIT_S), "the next save never got the buffer back"
    target = {"w": torch.zeros(64, 64)}
    ac.load(target, checkpoint_id=tmp_path / "b", no_dist=True)
    assert torch.equal(target["w"], state["w"])
    assert not (tmp_path / "a" / "metadata.json").exists()


def _pools_refuse_work(now: bool) -> None:
    """What interpreter exit does to thread pools before it waits for running threads:
    ``ThreadPoolExecutor.submit`` refuses new work from then on."""
    import concurrent.futures.thread as pool_module

    pool_module._shutdown = now


@pytest.fixture
def exiting_interpreter():
    yield _pools_refuse_work
    _pools_refuse_work(False)


class _ExitDuringSave(FileSystemWriter):
    """A writer whose save goes on after the interpreter's exit began."""

    def prepare(self, *, coordinator):
        super().prepare(coordinator=coordinator)
        _pools_refuse_work(True)


def _save_while_exiting(path, state, stager=None) -> None:
    """A thread-executor save during which exit begins; it must commit what loads back."""
    with ac.AsyncCheckpointer(executor="thread", no_dist=True, stager=stager) as ck:
        future = ck.save(state, storage_writer=_ExitDuringSave(path))
        future.result()
        _pools_refuse_work(False)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    ac.load(target, checkpoint_id=path, no_dist=True)
    assert all(torch.equal(target[k], state[k]) for k in state)


@pytest.mark.parametrize("tensors", [1, 6])  # one data file, and several written in parallel
def test_a_save_in_flight_at_interpreter_exit_still_commits(tmp_path, exiting_interpreter, tensors):
    """``AsyncCheckpointer`` waits for a save in flight at exit; the thread executor's save
    runs on then, after thread pools refuse work, and must still commit."""
    _save_while_exiting(tmp_path / "c", {f"w{i}": torch.randn(64, 64) for i in range(tensors)})


def test_waves_staged_after_exit_began_are_still_copied(tmp_path, exiting_interpreter):
    """With a memory budget and async staging, later waves are copied on the staging
    thread while the save runs; at exit the stager's copy pool refuses work too."""
    # 8 x 8 MiB in waves of 16 MiB, two buffers: waves 2.. are copied once earlier
    # ones are written, after the exit began
    state = {f"w{i}": torch.randn(2 << 20) for i in range(8)}
    stager = ac.Stager(async_staging=True, max_staging_bytes="32MiB", num_buffers=2, copy_threads=2)
    _save_while_exiting(tmp_path / "c", state, stager)


def test_a_forked_child_does_not_wait_for_its_parents_save(tmp_path):
    """multiprocessing's forked children (DataLoader workers) run the threading exit hooks:
    the copy of a save in flight they inherit is not theirs to wait for."""
    from faulty_storage import StopAtWriter, wait_reached

    gate = tmp_path / "gate"
    gate.mkdir()
    state = {"w": torch.randn(64, 64)}
    with ac.AsyncCheckpointer(executor="thread", no_dist=True) as ck:
        writer = StopAtWriter(tmp_path / "c", gate=gate, point="before-write")
        future = ck.save(state, storage_writer=writer)
        wait_reached(gate, "before-write")
        try:  # the save is still held: a child waiting for it never ends
            ended = exit_code_of_a_forked_child(WAIT_S)
        finally:
            (gate / "release").touch()
        future.result(WAIT_S)
    assert ended == 0, "the forked child waited for the parent's save"


def test_a_save_hung_at_exit_is_waited_for_once(tmp_path):
    """The exit hook waits the checkpointer's limit for a save in flight; close() after it
    stops a save still hung at once instead of waiting the limit a second time."""
    from faulty_storage import StopAtWriter, wait_reached

    from async_ckpt.executor import at_exit

    gate = tmp_path / "gate"
    gate.mkdir()
    ck = ac.AsyncCheckpointer(executor="thread", no_dist=True, group_timeout=0.5)
    try:
        writer = StopAtWriter(tmp_path / "c", gate=gate, point="before-write")
        future = ck.save({"w": torch.randn(8)}, storage_writer=writer)
        wait_reached(gate, "before-write")
        at_exit._finish_saves_in_flight()  # waits 0.5 s; the save is held
        assert not future.done()  # only waited: another thread may still use it
        waits: list[float | None] = []
        real_result = future.result

        def result(timeout=None):
            waits.append(timeout)
            return real_result(timeout)

        future.result = result  # type: ignore[method-assign]
        ck._finish_last(stop_if_hung=True)  # close()'s wait: no second 0.5 s, a stop
        assert waits == [0]
        del future.result
        with pytest.raises(ac.CheckpointError, match="stopped by close"):
            future.result(WAIT_S)
    finally:
        (gate / "release").touch()
        ck.close()
    assert not (tmp_path / "c" / "metadata.json").exists()


_MEMORY_AT_EXIT = textwrap.dedent(
    """
    import atexit, sys, torch, async_ckpt as ac

    root, memory = sys.argv[1], sys.argv[2]
    state = {"w": torch.arange(1000.0), "step": 7}
    manager = ac.CheckpointManager(root, memory_every=1, memory_root=memory, executor="thread")

    def at_exit():
        manager.save_to_memory(7, state).result()
        manager.close()
        with ac.CheckpointManager(
            root, memory_every=1, memory_root=memory, executor="thread"
        ) as again:
            target = {"w": torch.zeros(1000), "step": 0}
            step = again.restore(target)
            same = step == 7 and torch.equal(target["w"], state["w"])
            print("restored" if same else f"restored {step}", flush=True)

    atexit.register(at_exit)
    """
)


def test_a_memory_tier_save_in_an_atexit_handler_works(tmp_path):
    """Before: the tier's thread pool refused the round after the save had started."""
    assert run_python(_MEMORY_AT_EXIT, str(tmp_path / "s"), str(tmp_path / "m")) == "restored"
