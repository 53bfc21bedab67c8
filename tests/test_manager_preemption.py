"""CheckpointManager(save_on_preemption=...): a signal asks for a final save at the next
maybe_save, whatever the interval; the ranks agree on its step; handlers are chained and
put back.

The signals here are real: raised in this process (``signal.raise_signal``, delivered
before it returns), sent to a training subprocess's whole process group (as Slurm
does, so the checkpoint worker gets it too), and raised on one rank of two.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from async_ckpt.errors import CheckpointError
from async_ckpt.manager import CheckpointManager
from async_ckpt.manager.preemption import preemption_signals
from async_ckpt.storage.local import FileSystemWriter


def _state(step: int = 0) -> dict[str, Any]:
    return {"w": torch.full((64,), float(step)), "step": step}


def _manager(root: Any, **kwargs: Any) -> CheckpointManager:
    kwargs.setdefault("executor", "thread")
    kwargs.setdefault("keep_last", None)
    return CheckpointManager(root, **kwargs)


@pytest.fixture(autouse=True)
def _default_handlers() -> Iterator[None]:
    """Every test starts and must end with Python's own SIGTERM and SIGINT handlers."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    after = {sig: signal.getsignal(sig) for sig in before}
    for sig, handler in before.items():
        signal.signal(sig, handler)
    assert after == before, "a test left a signal handler installed"


# ------------------------------------------------------------------------------ one process


def test_signal_saves_at_the_next_maybe_save_off_the_interval(tmp_path: Path) -> None:
    with _manager(tmp_path, save_every=100, save_on_preemption=True) as manager:
        assert manager.maybe_save(1, _state(1)) is None
        assert not manager.preempted and manager.preemption_signal is None
        signal.raise_signal(signal.SIGTERM)  # the handler only records it
        assert manager.preemption_signal == signal.SIGTERM
        assert not manager.preempted and manager.steps() == []
        future = manager.maybe_save(2, _state(2))
        assert future is not None and manager.preempted and manager.preemption_step == 2
        assert manager.maybe_save(3, _state(3)) is None  # once
        signal.raise_signal(signal.SIGTERM)  # a second signal changes nothing
        assert manager.maybe_save(4, _state(4)) is None
    # close() waited for the final save and put Python's default handler back
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert future.done() and future.exception() is None
    with _manager(tmp_path) as manager:
        restored = _state()
        assert manager.steps() == [2] and manager.restore(restored) == 2
        assert restored["w"][0].item() == 2.0 and restored["step"] == 2


def test_a_step_already_saved_is_not_saved_twice(tmp_path: Path) -> None:
    with _manager(tmp_path, save_every=2, save_on_preemption=True) as manager:
        regular = manager.maybe_save(2, _state(2))
        signal.raise_signal(signal.SIGTERM)
        # the signal came after step 2 was saved: nothing new to save at step 2 ...
        assert manager.maybe_save(2, _state(2)) is regular and manager.preempted
        assert manager.preemption_step == 2
    with _manager(tmp_path, save_every=2, save_on_preemption=True) as manager:
        assert manager.restore(_state()) == 2
        signal.raise_signal(signal.SIGTERM)
        assert manager.maybe_save(2, _state(2)) is None  # ... nor right after restoring it
        assert manager.preempted and manager.steps() == [2]


def test_previous_python_handler_is_chained_and_put_back(tmp_path: Path) -> None:
    calls: list[int] = []

    def previous(signum: int, frame: Any) -> None:
        calls.append(signum)

    signal.signal(signal.SIGUSR1, previous)
    try:
        with _manager(tmp_path, save_on_preemption=(signal.SIGUSR1,)) as manager:
            assert signal.getsignal(signal.SIGUSR1) is not previous
            signal.raise_signal(signal.SIGUSR1)
            assert calls == [signal.SIGUSR1]  # the other library still hears it
            assert manager.preemption_signal == signal.SIGUSR1
            assert manager.maybe_save(7, _state(7)) is not None  # no save_every: only this
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert manager.steps() == [7]
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_default_sigint_handler_is_not_chained(tmp_path: Path) -> None:
    # Chaining to Python's own SIGINT handler would raise KeyboardInterrupt mid-step.
    # Set here: a shell starts background jobs with SIGINT ignored.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _manager(tmp_path, save_every=10, save_on_preemption=(signal.SIGINT, signal.SIGTERM)):
            signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_handler_left_under_a_later_one_forwards_after_close(tmp_path: Path) -> None:
    calls: list[int] = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        manager = _manager(tmp_path, save_on_preemption=(signal.SIGUSR2,))
        ours = signal.getsignal(signal.SIGUSR2)
        later = []
        signal.signal(
            signal.SIGUSR2, lambda signum, frame: (later.append(signum), ours(signum, frame))
        )
        manager.close()  # ours is not the installed handler any more: the later one stays
        assert signal.getsignal(signal.SIGUSR2) is not ours
        signal.raise_signal(signal.SIGUSR2)
        assert later == [signal.SIGUSR2] and calls == [signal.SIGUSR2]
        assert manager.preemption_signal is None  # a closed manager records nothing
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_request_preemption(tmp_path: Path) -> None:
    with _manager(tmp_path, save_every=5, save_on_preemption=True) as manager:
        manager.request_preemption()
        assert manager.preemption_signal is None
        assert manager.maybe_save(3, _state(3)) is not None and manager.preemption_step == 3
    with _manager(tmp_path) as manager, pytest.raises(CheckpointError, match="save_on_preemption"):
        manager.request_preemption()


def test_final_save_taken_even_if_the_save_before_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = FileSystemWriter.write_file

    def write_file(self: FileSystemWriter, name: str, segments: Any) -> None:
        if self.path.name == "step-00000004":
            raise OSError("injected write failure")
        return original(self, name, segments)

    monkeypatch.setattr(FileSystemWriter, "write_file", write_file)
    with _manager(tmp_path, save_every=4, save_on_preemption=True) as manager:
        failing = manager.maybe_save(4, _state(4))
        signal.raise_signal(signal.SIGTERM)
        with caplog.at_level(logging.WARNING, logger="async_ckpt"):
            final = manager.maybe_save(5, _state(5))
        assert final is not None
        assert "saving step 5 anyway" in caplog.text
    assert failing.exception() is not None and final.exception() is None
    assert manager.steps() == [5]


@pytest.mark.parametrize(
    "value",
    [(signal.SIGKILL,), ("SIGTERM",), (), 999, [signal.SIGTERM, 1.5], "SIGTERM"],
)
def test_invalid_signals(tmp_path: Path, value: Any) -> None:
    with pytest.raises(CheckpointError, match="save_on_preemption"):
        _manager(tmp_path, save_on_preemption=value)


@pytest.mark.parametrize("every", [0, None, 1.5, True])
def test_invalid_check_interval(tmp_path: Path, every: Any) -> None:
    with pytest.raises(CheckpointError, match="preemption_check_every"):
        _manager(tmp_path, save_on_preemption=True, preemption_check_every=every)


def test_signal_choices() -> None:
    assert preemption_signals(True) == (signal.SIGTERM,)
    assert preemption_signals(False) == preemption_signals(None) == ()
    assert preemption_signals(signal.SIGUSR1) == (signal.SIGUSR1,)
    assert preemption_signals([signal.SIGINT, signal.SIGTERM, signal.SIGINT]) == (
        signal.SIGINT,
        signal.SIGTERM,
    )


def test_maybe_save_still_needs_an_interval_without_preemption(tmp_path: Path) -> None:
    with _manager(tmp_path) as manager, pytest.raises(CheckpointError, match="save_every"):
        manager.maybe_save(1, _state())


def test_off_the_main_thread_refused_before_anything_starts(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def create() -> None:
        try:
            _manager(tmp_path, save_on_preemption=True)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], CheckpointError)
    assert "main thread" in str(errors[0]) and "request_preemption" in str(errors[0])


# ------------------------------------------------------------------------ a training process

GATED = textwrap.dedent(
    """
    from async_ckpt.storage.local import FileSystemWriter

    _PASSED = False


    class GatedWriter(FileSystemWriter):
        \"\"\"Holds the first data file of ``gated_dir`` until a byte arrives on the FIFO.\"\"\"

        def __init__(self, checkpoint_id, gate, gated_dir):
            super().__init__(checkpoint_id)
            self.gate, self.gated_dir = gate, gated_dir

        def write_file(self, name, segments):
            global _PASSED
            if self.path.name == self.gated_dir and not _PASSED:
                _PASSED = True
                with open(self.gate, "rb") as gate:  # in the checkpoint worker
                    gate.read(1)
            return super().write_file(name, segments)
    """
)

TRAIN = textwrap.dedent(
    """
    import json, signal, sys
    import torch
    import async_ckpt.executor.checkpointer as checkpointer
    from async_ckpt.manager import CheckpointManager
    from gated import GatedWriter

    root, gate = sys.argv[1], sys.argv[2]
    checkpointer.detect_writer = lambda cid: GatedWriter(cid, gate, "step-00000002")
    torch.set_num_threads(1)
    state = {"w": torch.zeros(4096), "step": 0}
    futures = {}
    with CheckpointManager(root, save_every=10**9, keep_last=None, save_on_preemption=True) as mgr:
        mgr.checkpointer.start(state)  # the worker is up (and ignores SIGTERM) from here
        worker = mgr.checkpointer.worker_pid
        for step in range(1, 10**6):
            state["w"].fill_(step)
            state["step"] = step
            if step == 2:
                futures[2] = mgr.save(2, state)  # its write waits at the gate
                print("ready", flush=True)
                sys.stdin.readline()  # the parent sends SIGTERM, opens the gate, then writes
                continue
            future = mgr.maybe_save(step, state)
            if future is not None:
                futures[step] = future
            if mgr.preempted:
                break
    print(json.dumps({
        "final": mgr.preemption_step,
        "signal": mgr.preemption_signal,
        "saved": sorted(futures),
        "errors": [repr(f.exception()) for f in futures.values() if f.exception() is not None],
        "same_worker": worker == mgr.checkpointer.worker_pid,
        "handler_restored": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    }), flush=True)
    """
)


@pytest.mark.multiprocess
def test_sigterm_to_the_process_group_then_resume(tmp_path: Path) -> None:
    (tmp_path / "gated.py").write_text(GATED)
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    # Read-write, so neither this open nor the worker's blocks; the worker's read does.
    gate_fd = os.open(gate, os.O_RDWR)
    root = tmp_path / "ck"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root), str(gate)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the worker is in it, pytest is not
    )
    try:
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its checkpoint worker
        os.write(gate_fd, b"g")  # the step-2 write goes on, in the same worker
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=180)
    finally:
        os.close(gate_fd)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err.decode()
    report = json.loads(out.decode().splitlines()[-1])
    final = report["final"]
    assert report["signal"] == signal.SIGTERM and report["errors"] == []
    assert report["same_worker"], "SIGTERM killed the checkpoint worker"
    assert report["handler_restored"]
    assert 3 <= final < 10**6 and report["saved"] == [2, final]
    assert "final checkpoint" in err.decode()

    with _manager(root, save_every=10**9, save_on_preemption=True) as manager:
        assert manager.steps() == [2, final]
        resumed = {"w": torch.zeros(4096), "step": 0}
        assert manager.restore(resumed) == final
        assert resumed["step"] == final and torch.equal(resumed["w"], torch.full((4096,), final))
        assert manager.maybe_save(final, resumed) is None  # the restored step is not saved again
        assert not manager.preempted


# ------------------------------------------------------------------------------- two ranks


def _two_rank_body(rank: int, world_size: int, root: str) -> list[dict[str, Any]]:
    results = []
    for check_every in (1, 2):
        state = {"w": torch.zeros(8), "step": 0}
        with CheckpointManager(
            f"{root}/every-{check_every}",
            executor="thread",
            save_every=1000,
            keep_last=None,
            save_on_preemption=True,
            preemption_check_every=check_every,
        ) as manager:
            for step in range(1, 50):
                state["w"].fill_(step)
                state["step"] = step
                if rank == 1 and step == 3:
                    signal.raise_signal(signal.SIGTERM)  # only rank 1 is told
                manager.maybe_save(step, state)
                if manager.preempted:
                    break
            checks = manager._preemption.agreement.calls
        results.append(
            {
                "final": manager.preemption_step,
                "signal": manager.preemption_signal,
                "checks": checks,
                "steps": manager.steps(),
            }
        )
    return results


@pytest.mark.multiprocess
def test_two_ranks_take_the_final_save_at_the_same_step(tmp_path: Path) -> None:
    from dist_utils import run_ranks

    every_step, every_other = zip(*run_ranks(_two_rank_body, 2, str(tmp_path)), strict=True)
    # Rank 1's flag of step 3 travels in the all-reduce started at step 3, read at step 4 ...
    assert [r["final"] for r in every_step] == [4, 4]
    assert [r["signal"] for r in every_step] == [None, signal.SIGTERM]
    assert [r["checks"] for r in every_step] == [4, 4]
    assert [r["steps"] for r in every_step] == [[4], [4]]
    # ... or, checking at even steps only, in the one started at step 4, read at step 6.
    assert [(r["final"], r["checks"], r["steps"]) for r in every_other] == [(6, 3, [6])] * 2
    restored = {"w": torch.zeros(8), "step": 0}
    with _manager(tmp_path / "every-1") as manager:
        assert manager.restore(restored) == 4 and restored["w"][0].item() == 4.0
