"""close() with a worker stopped (SIGSTOP) while idle returns after a short grace and
kills that worker, instead of waiting a minute (issue 13); a save the worker is still
writing is not cut short by that grace."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from faulty_storage import StopAtWriter, wait_reached
from helpers import wait_until

import async_ckpt
from async_ckpt.executor import process
from async_ckpt.executor.launch import CLOSE_GRACE_ENV

pytestmark = pytest.mark.multiprocess


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie not reaped yet counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_close_kills_a_stopped_idle_worker_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(CLOSE_GRACE_ENV, "1")
    ckpt = async_ckpt.AsyncCheckpointer(executor="process")
    pid = None
    try:
        state = {"w": torch.arange(100.0), "step": 1}
        ckpt.save(state, checkpoint_id=tmp_path / "ck").result(timeout=120)
        pid = ckpt.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        stopped = psutil.Process(pid)
        wait_until(lambda: stopped.status() == psutil.STATUS_STOPPED, 60, f"{pid} never stopped")
        closer = threading.Thread(target=ckpt.close, name="close", daemon=True)
        with caplog.at_level(logging.WARNING, logger="async_ckpt"):
            closer.start()
            # generous for a 1 s grace on a busy machine, short of the minute close() used to wait
            closer.join(timeout=45)
        assert not closer.is_alive(), "close() still waits for the stopped worker"
        assert _gone(pid)
        assert ckpt._executor._proc.returncode == -signal.SIGKILL
        assert f"pid {pid}" in caplog.text and "killing it" in caplog.text
    finally:
        if pid is not None and not _gone(pid):
            os.kill(pid, signal.SIGCONT)  # let it read "close" and exit, or be killed below
            os.kill(pid, signal.SIGKILL)
        ckpt.close()
    target = {"w": torch.zeros(100), "step": 0}
    async_ckpt.load(target, checkpoint_id=tmp_path / "ck")
    assert torch.equal(target["w"], state["w"]) and target["step"] == 1


def test_close_lets_an_in_flight_save_commit_whatever_the_grace(
    tmp_path: Path, gate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CLOSE_GRACE_ENV, "0")  # the grace starts only once no save is in flight
    waiting = threading.Event()
    real_wait = process.wait_futures

    def wait_futures(*args: Any, **kwargs: Any) -> Any:
        waiting.set()  # close() has told the worker to stop and waits for its saves
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(process, "wait_futures", wait_futures)
    ckpt = async_ckpt.AsyncCheckpointer(executor="process")
    try:
        ckpt.start()
        state = {"w": torch.arange(1000.0), "step": 7}
        held = StopAtWriter(tmp_path / "ck", gate=gate, point="before-write")
        future = ckpt.save(state, storage_writer=held)
        assert wait_reached(gate, "before-write") == ckpt.worker_pid
        closer = threading.Thread(target=ckpt._executor.close, name="close", daemon=True)
        closer.start()
        assert waiting.wait(timeout=60), "close() did not wait for the save in flight"
        (gate / "release").touch()
        closer.join(timeout=60)
        assert not closer.is_alive()
        assert future.result(timeout=0) is not None  # committed, not killed midway
    finally:
        (gate / "release").touch()
        ckpt.close()
    target = {"w": torch.zeros(1000), "step": 0}
    async_ckpt.load(target, checkpoint_id=tmp_path / "ck")
    assert torch.equal(target["w"], state["w"]) and target["step"] == 7
