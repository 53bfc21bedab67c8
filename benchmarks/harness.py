"""The measurement loop for one state size: setup, interleaved runs, probe.

The runner (run.py) handles the command line and the outputs; this module
owns what happens between building a state and summarising its figures.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from benchmarks import methods as registry
from benchmarks import report
from benchmarks.base import BenchContext, Method, remove_path
from benchmarks.limits import drop_page_cache, page_cache_fraction
from benchmarks.metrics import (
    RssSampler,
    StepProbe,
    median_ms,
    now,
    slowdown,
    summarize_methods,
)
from benchmarks.state import (
    assert_state_equal,
    build_state,
    clone_state,
    count_tensors,
    mutate,
    tensor_bytes,
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_save(m: Method, ctx: BenchContext, path: Path, do_load: bool) -> dict[str, Any]:
    """Time one save (stall/staged/commit) and, if supported, one cold load.

    For async methods the state is mutated again as soon as it is staged, as
    training would, and the loaded checkpoint must still match the snapshot
    taken at save() time.
    """
    mutate(ctx.state)  # a training step between checkpoints: every byte changes
    check = do_load and m.can_load
    # Snapshot outside the timed region; only needed when the state moves on.
    expected = m.expected(clone_state(ctx.state)) if check and m.is_async else None
    with RssSampler() as rss:
        t0 = now()
        pending = m.save(ctx.state, path)
        t1 = now()
        pending.wait_staged()
        t2 = now()
        if m.is_async:
            mutate(ctx.state)  # the next optimizer step races the write
        pending.wait_committed()
        t3 = now()
    rec: dict[str, Any] = {
        "return_s": t1 - t0,
        "staged_s": t2 - t0,
        "commit_s": t3 - t0,
        **rss.result(),
    }
    if check:
        drop_page_cache(path)
        rec["cache_resident_before_load"] = page_cache_fraction(path)
        with RssSampler() as rss:
            t0 = now()
            loaded = m.load(ctx, path)
            rec["load_s"] = now() - t0
        rec["rss_load_delta"] = rss.result()["rss_main_delta"]
        # Compared outside the timed region.
        assert_state_equal(loaded, expected if expected is not None else m.expected(ctx.state))
        del loaded, expected
    return rec


def probe_save(
    m: Method, ctx: BenchContext, path: Path, probe: StepProbe, alone_s: float
) -> dict[str, Any]:
    """One extra save with the step probe running while the write is in flight.

    The baseline is measured both before and after, since a shared VM's CPU
    speed drifts on the scale of seconds.
    """
    before = probe.alone(alone_s)
    mutate(ctx.state)
    t0 = now()
    pending = m.save(ctx.state, path)
    pending.wait_staged()
    probe.start()  # training resumes once the state is staged
    pending.wait_committed()
    during = probe.stop()
    commit = now() - t0
    remove_path(path)
    alone = before + probe.alone(alone_s)
    return {
        "slowdown": slowdown(alone, during),
        "step_alone_ms": median_ms(alone),
        "step_during_ms": median_ms(during),
        "steps_alone": len(alone),
        "steps_during": len(during),
        "commit_under_load_s": commit,
    }


def bench_size(
    size: int, label: str, names: list[str], args: argparse.Namespace, scratch: Path
) -> dict[str, Any]:
    root = scratch / label
    root.mkdir()
    t0 = now()
    state = build_state(size, seed=args.seed)
    ctx = BenchContext(root=root, state=state, nbytes=tensor_bytes(state))
    log(
        f"[{label}] built state: {report.fmt_bytes(ctx.nbytes)} in "
        f"{count_tensors(state)} tensors ({now() - t0:.1f}s)"
    )
    out: dict[str, dict[str, Any]] = {n: {"runs": []} for n in names}
    active: dict[str, Method] = {}
    for name in names:
        try:
            m = registry.create(name)
            t0 = now()
            m.setup(ctx)
            out[name]["setup_s"] = now() - t0
            active[name] = m
        except Exception:
            out[name]["error"] = traceback.format_exc()
            log(f"[{label}] {name}: setup failed\n{out[name]['error']}")
    for r in range(args.repeats):
        for name, m in list(active.items()):
            path = root / f"{name}.r{r}"
            try:
                rec = one_save(m, ctx, path, do_load=not args.no_load)
            except Exception:
                out[name]["error"] = traceback.format_exc()
                log(f"[{label}] {name}: run {r + 1} failed, dropping it\n{out[name]['error']}")
                active.pop(name)
                continue
            finally:
                remove_path(path)
            out[name]["runs"].append(rec)
            load = f" load {rec['load_s']:.3f}s" if "load_s" in rec else ""
            log(
                f"[{label}] run {r + 1}/{args.repeats} {name:<24} return {rec['return_s']:.3f}s "
                f"staged {rec['staged_s']:.3f}s commit {rec['commit_s']:.3f}s{load} "
                f"RSS+{report.fmt_bytes(rec['rss_main_delta'])} "
                f"children {report.fmt_bytes(rec['rss_children_peak'])} "
                f"(+{report.fmt_bytes(rec['rss_children_delta'])})"
            )
    if not args.no_probe:
        probe = StepProbe(seed=args.seed)
        for name, m in active.items():
            if m.is_async:
                try:
                    out[name]["probe"] = probe_save(
                        m, ctx, root / f"{name}.probe", probe, args.probe_alone_s
                    )
                    log(f"[{label}] probe {name:<24} slowdown {out[name]['probe']['slowdown']}")
                except Exception:
                    log(f"[{label}] probe {name} failed\n{traceback.format_exc()}")
    for name, m in active.items():
        out[name]["info"] = m.info()
        m.teardown()
    summarize_methods(out, registry.WRITE_FLOOR, registry.COPY_FLOOR)
    shutil.rmtree(root, ignore_errors=True)
    return {
        "label": label,
        "size": size,
        "nbytes": ctx.nbytes,
        "n_tensors": count_tensors(state),
        "methods": out,
    }
