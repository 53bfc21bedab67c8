"""async_ckpt alone in a fresh process: memory footprint and first-save cost.

The main harness holds every method's buffers at once, so its absolute RSS
says little about one method. This child process holds only the state and
async_ckpt, and reports:

* the main process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``
  before each phase, so it is exact rather than sampled) over the RSS it had
  before building the state, for a synchronous save and for async saves;
  the target is state + one arena;
* the worker's private memory: the peak of RssAnon while saves are in flight
  and psutil's USS after each (pages private to the worker: the staging
  arena is shared with this process and not counted);
* the first save after ``start()`` (worker only), after ``start(state)``
  (worker and staging arenas), and of a checkpointer that was never started,
  next to the later saves, and what each start took.

    python -m benchmarks.isolated --size 1GiB --dir .bench-tmp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import async_ckpt
from benchmarks.base import remove_path
from benchmarks.metrics import now
from benchmarks.ours import UssSampler, start_checkpointer, worker_uss
from benchmarks.sizes import parse_size
from benchmarks.state import build_state, mutate, tensor_bytes


def _status(field: str) -> int:
    """A memory field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _timed_save(ckpt: async_ckpt.AsyncCheckpointer, state: dict, path: Path) -> dict[str, Any]:
    mutate(state)
    sampler = None
    t0 = now()
    fut = ckpt.save(state, checkpoint_id=str(path))
    t1 = now()
    if ckpt.worker_pid:
        sampler = UssSampler(ckpt.worker_pid).start()
    fut.staged.result()
    t2 = now()
    mutate(state)  # training goes on while the write is in flight
    fut.result()
    t3 = now()
    anon = sampler.stop() if sampler else None
    uss = sampler.uss() if sampler else None
    rec = {
        "return_s": t1 - t0,
        "staged_s": t2 - t0,
        "commit_s": t3 - t0,
        "plan_s": fut.stats.plan_s,
        "worker_anon_peak": anon,
        "worker_uss_after": uss,
        "worker_uss_peak": max(anon or 0, uss or 0) or None,
    }
    remove_path(path)
    return rec


def profile(size: int, root: Path, seed: int, saves: int) -> dict[str, Any]:
    rss0 = _status("VmRSS")
    state = build_state(size, seed=seed)
    nbytes = tensor_bytes(state)
    rss_state = _status("VmRSS")
    out: dict[str, Any] = {"nbytes": nbytes, "rss_before_state": rss0, "rss_with_state": rss_state}
    out["hwm_reset_works"] = reset_peak()

    # 1. synchronous save: writes from the tensors' own memory
    t0 = now()
    async_ckpt.save(state, checkpoint_id=str(root / "sync"), no_dist=True)
    out["sync_save_s"] = now() - t0
    out["sync_peak_over_base"] = _status("VmHWM") - rss0
    remove_path(root / "sync")

    # 2. a started checkpointer, `saves` saves
    reset_peak()
    ckpt = async_ckpt.AsyncCheckpointer(no_dist=True)
    t0 = now()
    ckpt.start()
    out["start_s"] = now() - t0
    out["worker_uss_idle"] = worker_uss(ckpt.worker_pid)
    out["started"] = [_timed_save(ckpt, state, root / f"started-{k}") for k in range(saves)]
    out["async_peak_over_base"] = _status("VmHWM") - rss0
    ckpt.close()

    # 2b. start(state): the worker and the staging arenas before the first save
    ckpt = async_ckpt.AsyncCheckpointer(no_dist=True)
    t0 = now()
    reserved = start_checkpointer(ckpt, state)
    out["start_with_state_s"] = now() - t0
    if reserved:
        out["started_with_state"] = [
            _timed_save(ckpt, state, root / f"reserved-{k}") for k in range(2)
        ]
    ckpt.close()

    # 3. never started: the first save spawns the worker itself
    ckpt = async_ckpt.AsyncCheckpointer(no_dist=True)
    out["not_started"] = [_timed_save(ckpt, state, root / f"cold-{k}") for k in range(2)]
    ckpt.close()

    steady = out["started"][1:] or out["started"]
    out["state_plus_arena"] = 2 * nbytes
    out["main_peak_vs_state_plus_arena"] = out["async_peak_over_base"] / (2 * nbytes)
    uss = [r["worker_uss_peak"] for r in out["started"] if r["worker_uss_peak"]]
    out["worker_uss_peak"] = max(uss) if uss else None
    out["worker_uss_vs_state"] = out["worker_uss_peak"] / nbytes if uss else None
    out["steady_staged_s"] = sorted(r["staged_s"] for r in steady)[len(steady) // 2]
    out["steady_commit_s"] = sorted(r["commit_s"] for r in steady)[len(steady) // 2]
    return out


def run_child(size: int, root: Path, seed: int, saves: int, timeout: float = 1800) -> dict:
    """Run profile() in a fresh interpreter; returns its figures."""
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="isolated-", suffix=".json", dir=root)
    os.close(fd)
    out = Path(name)
    cmd = [sys.executable, "-m", "benchmarks.isolated", "--bytes", str(size), "--dir", str(root)]
    cmd += ["--seed", str(seed), "--saves", str(saves), "--json", str(out)]
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    try:
        subprocess.run(cmd, check=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def one_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return "failed"
    first, cold = r["started"][0], r["not_started"][0]
    uss = r["worker_uss_vs_state"]
    return (
        f"start {r['start_s']:.2f}s; first save after start staged {first['staged_s']:.3f}s "
        f"commit {first['commit_s']:.3f}s; without start staged {cold['staged_s']:.3f}s "
        f"commit {cold['commit_s']:.3f}s; steady staged {r['steady_staged_s']:.3f}s; main peak "
        f"{r['main_peak_vs_state_plus_arena']:.2f}x (state+arena); worker USS "
        + ("?" if uss is None else f"{uss:.3f}x state")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.isolated", description=__doc__)
    p.add_argument("--bytes", type=int, default=None)
    p.add_argument("--size", default=None, help="e.g. 1GiB (instead of --bytes)")
    p.add_argument("--dir", type=Path, default=Path(".bench-tmp"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.bytes is None:
        args.bytes = parse_size(args.size or "1GiB")
    args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="isolated-", dir=args.dir))
    try:
        result = profile(args.bytes, root, args.seed, max(2, args.saves))
    finally:
        remove_path(root)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    else:
        print(text)
    print(one_line(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
