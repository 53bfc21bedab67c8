"""Preemption: a signal asks for one last save, taken at the manager's next ``maybe_save``.

:class:`SignalWatcher` installs the handler. It runs on the main thread between
two bytecodes of whatever the training loop is doing, so it only stores the
signal's number in an attribute: no lock (the interrupted code may hold it), no
logging, no I/O. It then calls the handler it replaced when that one is a
Python function (another library's hook), but not Python's default SIGINT
handler, which would raise KeyboardInterrupt in the middle of the step.

:class:`RankAgreement` makes all ranks take the final save at the same step:
a signal may reach the ranks at different steps (or only one of them), so at
every ``maybe_save`` the ranks all-reduce one integer (the maximum of their
flags) over a gloo group of their own, never the training group or its device.
The all-reduce is started at one ``maybe_save`` and its result read at the
next, so it runs while the step trains and the training thread does not wait
for it: the ranks decide one step after the signal was seen. The k-th call
reads the k-1-th all-reduce on every rank, so all ranks decide alike.

:class:`Preemption` is the manager's side: the watcher, the agreement, how often
the ranks check, and the step of the final save once they agreed.
"""

from __future__ import annotations

import datetime
import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

from ..errors import CheckpointError

log = logging.getLogger("async_ckpt")

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM,)
"""What ``save_on_preemption=True`` listens to: SIGTERM, what schedulers (Slurm,
Kubernetes, torchrun) send before they kill a job."""

_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def preemption_signals(value: bool | int | Iterable[int] | None) -> tuple[signal.Signals, ...]:
    """The signals ``save_on_preemption=value`` listens to; ``()`` when it is off.

    ``True``: :data:`DEFAULT_SIGNALS`; ``False``/``None``: off; a signal or
    an iterable of signals: those.
    """
    if value is None or value is False:
        return ()
    if value is True:
        return DEFAULT_SIGNALS
    if isinstance(value, int):
        items: list[Any] = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        items = list(value)
    else:
        items = [value]  # refused below
    if not items:
        raise CheckpointError("save_on_preemption names no signal; pass True for SIGTERM")
    found: list[signal.Signals] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise CheckpointError(
                f"save_on_preemption takes True, False or signals (signal.SIGTERM, ...), "
                f"not {item!r}"
            )
        try:
            sig = signal.Signals(item)
        except ValueError:
            raise CheckpointError(f"save_on_preemption: {item} is not a signal number") from None
        if sig in _UNCATCHABLE:
            raise CheckpointError(f"save_on_preemption: {sig.name} cannot be caught")
        found.append(sig)
    return tuple(dict.fromkeys(found))


def signal_name(signum: int) -> str:
    """``15`` -> ``"SIGTERM"``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalWatcher:
    """Records the first of ``signals`` that arrives; restores the old handlers on ``uninstall``."""

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self.signals = signals
        self.received: int | None = None  # written by the handler only
        self.requested = False  # request() was called
        self._previous: dict[int, Any] = {}
        self._active = False
        self._handler = self._handle  # one bound method, to recognise it in getsignal()

    @staticmethod
    def check_thread() -> None:
        """Raise CheckpointError unless called on the main thread (where handlers go)."""
        if threading.current_thread() is not threading.main_thread():
            raise CheckpointError(
                "save_on_preemption installs a signal handler, which Python allows only in "
                "the main thread: create the CheckpointManager there, or pass "
                "save_on_preemption=False and call manager.request_preemption() yourself"
            )

    def install(self) -> None:
        """Install the handler (main thread only: Python delivers signals there)."""
        self.check_thread()
        self._active = True  # first: a signal right after the first install is recorded
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def request(self) -> None:
        """Record a request without a signal (``CheckpointManager.request_preemption``)."""
        self.requested = True

    @property
    def pending(self) -> bool:
        """Whether a signal came or a request was made."""
        return self.received is not None or self.requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum)
        if self._active:
            if self.received is None:  # a plain attribute store: safe wherever it interrupts
                self.received = signum
            if callable(previous) and previous is not signal.default_int_handler:
                previous(signum, frame)
            return
        # Uninstalled but still called (a later handler chains to this one, or the
        # restore failed): act as the handler this one replaced would have.
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def uninstall(self) -> None:
        """Put back the handlers this one replaced, where it is still the installed one."""
        if not self._active:
            return
        self._active = False
        for sig, previous in self._previous.items():
            try:
                if signal.getsignal(sig) == self._handler:
                    signal.signal(sig, signal.SIG_DFL if previous is None else previous)
            except (ValueError, OSError) as exc:  # not on the main thread
                log.warning(
                    "could not restore the previous %s handler (%s); the manager's handler "
                    "now forwards to it",
                    signal.Signals(sig).name,
                    exc,
                )


class RankAgreement:
    """Whether any rank asked, agreed by all ranks with one tiny all-reduce per call.

    With ``distributed`` false :meth:`any` answers the local flag at once and
    costs nothing. Otherwise building it is a collective (``new_group`` of a
    gloo group with the ranks of ``process_group``, called on every rank of the
    default group), and every :meth:`any` starts one all-reduce and reads the
    previous one: all ranks must call it equally often.
    """

    def __init__(self, process_group: Any, distributed: bool, timeout_s: float) -> None:
        self.group = None
        self.calls = 0
        self._work: Any = None
        self._flag: Any = None
        if distributed:
            import torch.distributed as dist

            from ..dist.ranks import arrive

            ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
            # new_group is a collective: a manager made on some ranks only fails, bounded
            arrive(
                process_group,
                dist.get_rank(process_group),
                len(ranks),
                "CheckpointManager(save_on_preemption=...)",
            )
            self.group = dist.new_group(
                ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)
            )

    def any(self, local: bool) -> bool:
        """True on every rank alike once ``local`` was true on some rank: at once on one
        rank; with several, at the call after the one where it was (the same call on
        every rank). Once it answered True it starts nothing more."""
        self.calls += 1
        if self.group is None:
            return local
        import torch
        import torch.distributed as dist

        agreed = False
        if self._work is not None:
            self._work.wait()  # started a step ago: done, unless a rank lags a whole step
            self._work = None
            agreed = bool(self._flag.item())
        if not agreed:
            self._flag = torch.tensor([1 if local else 0], dtype=torch.int32)
            self._work = dist.all_reduce(
                self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True
            )
        return agreed

    def close(self) -> None:
        """Finish the all-reduce in flight (every rank started it at its last call)."""
        work, self._work = self._work, None
        if work is not None:
            try:
                work.wait()
            except Exception as exc:  # a rank died: nothing depends on this answer any more
                log.warning("the last preemption check among the ranks failed: %s", exc)


class Preemption:
    """What ``CheckpointManager(save_on_preemption=...)`` keeps: a signal watcher, the
    ranks' agreement (made by :meth:`start`) and, once agreed, the final save's step."""

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self.watcher = SignalWatcher(signals)
        self.watcher.check_thread()  # before a worker is started
        self.agreement: RankAgreement | None = None
        self.step: int | None = None  # the final save's, once the ranks agreed

    def start(self, process_group: Any, distributed: bool, timeout_s: float) -> None:
        """Join the ranks' agreement (a collective on several ranks: call it where every
        rank is) and install the signal handlers."""
        self.agreement = RankAgreement(process_group, distributed, timeout_s)
        self.watcher.install()

    def agreed(self, step: int, check_every: int) -> bool:
        """Whether the ranks agree, at this ``maybe_save``, that the final save is due.

        One rank decides alone, at once; several all-reduce at the steps divisible by
        ``check_every`` only (every rank calls this at the same steps).
        """
        agreement = self.agreement
        if agreement is None or self.step is not None:
            return False
        checks = agreement.group is None or step % check_every == 0
        return checks and agreement.any(self.watcher.pending)

    def reason(self) -> str:
        """Why the final save is taken, for the log."""
        if self.watcher.received is not None:
            return signal_name(self.watcher.received)
        return "request_preemption()" if self.watcher.requested else "on another rank"

    def close(self) -> None:
        """Put the replaced handlers back; finish the agreement's all-reduce in flight."""
        self.watcher.uninstall()
        if self.agreement is not None:
            self.agreement.close()
