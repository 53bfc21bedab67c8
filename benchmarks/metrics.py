"""Measurement helpers: summaries, peak-RSS sampling, and a training-step probe."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import psutil
import torch

now = time.perf_counter


def summarize(values: Sequence[float | None]) -> dict[str, Any] | None:
    """Steady state = runs 2..N (run 1 pays warm-up: page faults, pools, daemons).

    Returns median/min/max over the steady runs plus the first run on its own.
    """
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    steady = vals[1:] if len(vals) > 1 else vals
    return {
        "median": statistics.median(steady),
        "min": min(steady),
        "max": max(steady),
        "first": vals[0],
        "n": len(steady),
    }


_FIRST_KEYS = (
    "return_s",
    "staged_s",
    "commit_s",
    "load_s",
    "rss_main_delta",
    "rss_main_peak",
    "rss_children_peak",
    "rss_children_delta",
    "rss_load_delta",
)


def _numeric_keys(runs: list[dict[str, Any]]) -> list[str]:
    """The fixed keys first, then any numeric per-run figure a method added (run_info)."""
    keys = dict.fromkeys(_FIRST_KEYS)
    for r in runs:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.setdefault(k)
    return list(keys)


def summarize_methods(out: dict[str, dict[str, Any]], write_floor: str, copy_floor: str) -> None:
    """Add 'summary' and 'ratios' to each method's record, in place.

    Ratios divide by the floors' medians from the same run, so slow drift of a
    shared machine cancels out as far as interleaving allows. A method whose
    info names an ``all_changed_reference`` also gets its staged time over that
    method's (the skip_unchanged comparison).
    """
    for m in out.values():
        runs = m["runs"]
        m["summary"] = {k: summarize([r.get(k) for r in runs]) for k in _numeric_keys(runs)}

    def med(name: str, key: str) -> float | None:
        s = out.get(name, {}).get("summary", {}).get(key)
        return s["median"] if s else None

    write = med(write_floor, "commit_s")
    copy = med(copy_floor, "commit_s")
    read = med(write_floor, "load_s")
    for name, m in out.items():
        c, s, ld = med(name, "commit_s"), med(name, "staged_s"), med(name, "load_s")
        m["ratios"] = {
            "commit_vs_write": c / write if c and write else None,
            "staged_vs_copy": s / copy if s and copy else None,
            "load_vs_read": ld / read if ld and read else None,
        }
        ref = m.get("info", {}).get("all_changed_reference")
        if ref:
            r = med(ref, "staged_s")
            m["ratios"]["staged_vs_all_changed"] = s / r if s and r else None


class RssSampler:
    """Peak RSS of this process and of all its descendants, sampled in a thread.

    RSS counts shared-memory pages in every process that touched them, so a
    staging buffer shared with a writer process shows up on both sides.
    """

    def __init__(self, interval_s: float = 0.01, children_refresh_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.children_refresh_s = children_refresh_s
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_rss = 0
        self.start_children_rss = 0
        self.peak_rss = 0
        self.peak_children_rss = 0

    def _children_rss(self, children: list[psutil.Process]) -> int:
        total = 0
        for c in children:
            try:
                total += c.memory_info().rss
            except psutil.Error:  # exited between listing and sampling
                pass
        return total

    def _sample(self, children: list[psutil.Process]) -> None:
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        self.peak_children_rss = max(self.peak_children_rss, self._children_rss(children))

    def _loop(self) -> None:
        # Listing children scans /proc, so refresh the list less often than we sample.
        children = self._proc.children(recursive=True)
        last_refresh = now()
        while not self._stop.wait(self.interval_s):
            if now() - last_refresh > self.children_refresh_s:
                children = self._proc.children(recursive=True)
                last_refresh = now()
            self._sample(children)
        self._sample(self._proc.children(recursive=True))

    def __enter__(self) -> RssSampler:
        self.start_rss = self.peak_rss = self._proc.memory_info().rss
        children = self._proc.children(recursive=True)
        self.start_children_rss = self.peak_children_rss = self._children_rss(children)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict[str, int]:
        return {
            "rss_main_peak": self.peak_rss,
            "rss_main_delta": self.peak_rss - self.start_rss,
            "rss_children_peak": self.peak_children_rss,
            # Long-lived helpers (e.g. DCP's daemon) sit in the peak; the delta is this run's.
            "rss_children_delta": self.peak_children_rss - self.start_children_rss,
        }


class StepProbe:
    """A fixed single-threaded CPU 'training step' whose duration we watch.

    Slowdown = median step time while a background write is in flight divided
    by the median step time alone, measured back to back on the same machine.
    It catches GIL contention (writer threads in this process) and core or
    memory-bandwidth contention (writer processes).
    """

    def __init__(self, matmuls_per_step: int = 8, dim: int = 256, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.a = torch.randn(dim, dim, generator=gen)
        self.b = torch.randn(dim, dim, generator=gen)
        self.matmuls_per_step = matmuls_per_step
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps: list[float] = []

    def _step(self) -> float:
        t0 = now()
        x = self.a
        for _ in range(self.matmuls_per_step):
            x = torch.mm(x, self.b)
            x = x * 0.01  # keep values bounded; a little Python work per op
        return now() - t0

    def _loop(self) -> None:
        torch.set_num_threads(1)  # per-thread with OpenMP builds; other threads keep theirs
        self._step()  # warm this thread's BLAS state
        while not self._stop.is_set():
            self.steps.append(self._step())

    def start(self) -> None:
        self.steps = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="step-probe", daemon=True)
        self._thread.start()

    def stop(self) -> list[float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.steps

    def alone(self, seconds: float) -> list[float]:
        """Step times with nothing else going on (same thread setup as in flight)."""
        self.start()
        time.sleep(seconds)
        return self.stop()


def median_ms(steps: list[float]) -> float | None:
    return statistics.median(steps) * 1e3 if steps else None


def slowdown(alone: list[float], during: list[float]) -> float | None:
    if not alone or not during:
        return None
    return statistics.median(during) / statistics.median(alone)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if abs(v) >= 100 else f"{v:.3g} {unit}"
    return f"{int(n)} B"
