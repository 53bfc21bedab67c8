"""The measurement loop for one state size: setup, interleaved runs, probe.

The runner (run.py) handles the command line and the outputs; this module
owns what happens between building a state and summarising its figures.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from benchmarks import isolated
from benchmarks import methods as registry
from benchmarks.base import BenchContext, Method, remove_path
from benchmarks.limits import drop_page_cache, page_cache_fraction
from benchmarks.metrics import (
    RssSampler,
    StepProbe,
    fmt_bytes,
    median_ms,
    now,
    slowdown,
    summarize_methods,
)
from benchmarks.state import (
    assert_state_equal,
    build_state,
    count_tensors,
    digest_state,
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
    # What the checkpoint must hold, taken outside the timed region (a digest,
    # not a clone: at 4 GiB a clone would not fit beside everything else).
    expected = digest_state(m.expected(ctx.state)) if check else None
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
        **m.run_info(),
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
        assert_state_equal(digest_state(loaded), expected)
        del loaded
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
    m.run_info()  # drop the probe save's figures
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


GiB = 1 << 30


def plan_memory(
    methods: dict[str, Method], nbytes: int, do_load: bool
) -> tuple[list[str], dict[str, Any]]:
    """Which methods fit in RAM together; returns names to skip and the estimate.

    Methods are set up together and interleaved, so their buffers coexist.
    Keep the limits, then async_ckpt, then peers (Method.priority), in
    registry order, while the estimate stays within what is available now.
    """
    avail = psutil.virtual_memory().available
    reserve = GiB + nbytes // 4  # dirty page cache, allocator slack, the probe
    base = nbytes if do_load else 0  # the shared load template
    budget = avail - reserve - base
    order = sorted(methods, key=lambda n: methods[n].priority)  # stable: registry order kept
    used, transient, skipped = 0, 0, []
    for name in order:
        m = methods[name]
        need = int(m.resident_factor() * nbytes)
        t = int(m.transient_factor() * nbytes)
        if used + need + max(transient, t) > budget:
            skipped.append(name)
            continue
        used += need
        transient = max(transient, t)
    return skipped, {
        "available": avail,
        "reserve": reserve,
        "template": base,
        "resident": used,
        "transient": transient,
    }


def bench_size(
    size: int, label: str, names: list[str], args: argparse.Namespace, scratch: Path
) -> dict[str, Any]:
    root = scratch / label
    root.mkdir()
    t0 = now()
    state = build_state(size, seed=args.seed)
    ctx = BenchContext(root=root, state=state, nbytes=tensor_bytes(state))
    n_tensors = count_tensors(state)
    log(
        f"[{label}] built state: {fmt_bytes(ctx.nbytes)} in {n_tensors} tensors ({now() - t0:.1f}s)"
    )
    out: dict[str, dict[str, Any]] = {n: {"runs": []} for n in names}
    created: dict[str, Method] = {}
    for name in names:
        try:
            created[name] = registry.create(name)
        except Exception:
            out[name]["error"] = traceback.format_exc()
            log(f"[{label}] {name}: create failed\n{out[name]['error']}")
    skipped, memory = plan_memory(created, ctx.nbytes, not args.no_load)
    if skipped:
        why = (
            f"skipped: not enough RAM for all methods at once ({fmt_bytes(memory['available'])} "
            f"available, {fmt_bytes(memory['resident'])} resident buffers kept)"
        )
        log(f"[{label}] {why}: {', '.join(skipped)}")
        for name in skipped:
            out[name]["skipped"] = why
            created.pop(name)
    ready: dict[str, Method] = {}

    def setup(name: str, m: Method) -> None:
        try:
            t0 = now()
            m.setup(ctx)
            out[name]["setup_s"] = now() - t0
            ready[name] = m
        except Exception:
            out[name]["error"] = traceback.format_exc()
            log(f"[{label}] {name}: setup failed\n{out[name]['error']}")

    together = [(n, m) for n, m in created.items() if m.parallel_setup]
    with ThreadPoolExecutor(max(1, len(together))) as pool:
        futures = [pool.submit(setup, n, m) for n, m in together]
        for name, m in created.items():
            if not m.parallel_setup:
                setup(name, m)
        for f in futures:
            f.result()
    active = {n: ready[n] for n in created if n in ready}  # registry order for the runs
    for r in range(args.repeats):
        # The order rotates each run: with a fixed order the slot itself moved the
        # figures (a write right after a removal ran faster; see benchmarks/README.md).
        order = list(active)
        k = r % len(order) if order else 0
        for name in order[k:] + order[:k]:
            m = active[name]
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
                f"[{label}] run {r + 1}/{args.repeats} {name:<26} return {rec['return_s']:.3f}s "
                f"staged {rec['staged_s']:.3f}s commit {rec['commit_s']:.3f}s{load} "
                f"RSS+{fmt_bytes(rec['rss_main_delta'])} "
                f"children {fmt_bytes(rec['rss_children_peak'])} "
                f"(+{fmt_bytes(rec['rss_children_delta'])})"
            )
    if not args.no_probe:
        probe = StepProbe(seed=args.seed)
        for name, m in active.items():
            if m.is_async:
                try:
                    out[name]["probe"] = probe_save(
                        m, ctx, root / f"{name}.probe", probe, args.probe_alone_s
                    )
                    log(f"[{label}] probe {name:<26} slowdown {out[name]['probe']['slowdown']}")
                except Exception:
                    log(f"[{label}] probe {name} failed\n{traceback.format_exc()}")
    for name, m in active.items():
        try:
            out[name]["info"] = m.info()
        finally:
            m.teardown()
    summarize_methods(out, registry.WRITE_FLOOR, registry.COPY_FLOOR)
    result = {
        "label": label,
        "size": size,
        "nbytes": ctx.nbytes,
        "n_tensors": n_tensors,
        "memory_plan": memory,
        "methods": out,
    }
    # Free this process's copy of the state before the isolated child builds its own.
    active.clear()
    created.clear()
    ready.clear()
    del state
    ctx.state, ctx._template = {}, None
    gc.collect()
    if args.isolated and any(n.startswith("async_ckpt") for n in names):
        try:
            result["isolated"] = isolated.run_child(size, root, args.seed, args.isolated_saves)
            log(f"[{label}] isolated: {isolated.one_line(result['isolated'])}")
        except Exception:
            result["isolated"] = {"error": traceback.format_exc()}
            log(f"[{label}] isolated profile failed\n{result['isolated']['error']}")
    shutil.rmtree(root, ignore_errors=True)
    return result
