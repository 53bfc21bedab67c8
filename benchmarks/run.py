"""Benchmark entry point: every registered method, same state, one process.

    python -m benchmarks.run --size 1GiB --repeats 5 --methods all \
        --dir .bench-tmp --out benchmarks/results

Runs are interleaved (A B C A B C ...) so slow drift of a shared disk hits all
methods alike; steady state is the median of runs 2..N; ratios use figures
from this same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import methods as registry
from benchmarks import multirank, plots, report, targets
from benchmarks.floors import best_floors, direct_io_unsupported
from benchmarks.harness import bench_size, log
from benchmarks.limits import check_fadvise
from benchmarks.metrics import fmt_bytes
from benchmarks.peers import shutdown_dcp
from benchmarks.sizes import parse_size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--size",
        nargs="+",
        action="extend",
        default=None,
        help="state size(s), e.g. 256MiB 1GiB (or comma-separated; may be repeated)",
    )
    p.add_argument("--repeats", type=int, default=5, help="runs per method (>=2 recommended)")
    p.add_argument(
        "--methods",
        default="all",
        help=f"'all', 'none', 'floors' (the write/read floor variants) or comma list of: "
        f"{', '.join(registry.REGISTRY)}",
    )
    p.add_argument(
        "--ranks",
        type=int,
        action="append",
        default=[],
        help="also run the multi-rank comparison with this many ranks (repeatable: "
        "--ranks 2 --ranks 4); total state = --ranks-size",
    )
    p.add_argument(
        "--ranks-size",
        default=None,
        help="total state of the multi-rank runs (default: 1st --size)",
    )
    p.add_argument(
        "--ranks-mode",
        choices=("busy", "idle", "both"),
        default="both",
        help="multi-rank: ranks mutate their state during the write (busy: CPU-bound "
        "training), wait (idle: training on an accelerator), or one run of each",
    )
    p.add_argument(
        "--isolated",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the fresh-process async_ckpt profile (peak memory, first-save cost); "
        "on by default, off with --smoke",
    )
    p.add_argument("--isolated-saves", type=int, default=3)
    p.add_argument(
        "--dir",
        type=Path,
        default=Path(".bench-tmp"),
        help="scratch dir on the disk under test (a private subdir is used)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-load", action="store_true", help="skip cold-load timing")
    p.add_argument("--no-probe", action="store_true", help="skip the step-slowdown probe")
    p.add_argument("--probe-alone-s", type=float, default=1.0)
    p.add_argument("--smoke", action="store_true", help="tiny quick run (4MiB, 2 repeats)")
    args = p.parse_args(argv)
    if args.smoke:  # tiny and quick; an explicit --size still wins
        args.size, args.repeats, args.probe_alone_s = args.size or ["4MiB"], 2, 0.2
        args.isolated_saves = 2
        args.isolated = bool(args.isolated)  # costs two worker starts: only on request
    args.isolated = True if args.isolated is None else args.isolated
    args.size = args.size or ["1GiB"]
    labels = dict.fromkeys(s.strip() for tok in args.size for s in tok.split(",") if s.strip())
    try:
        args.sizes = [(parse_size(label), label) for label in labels]
        args.ranks_bytes = parse_size(args.ranks_size) if args.ranks_size else args.sizes[0][0]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if any(r < 2 for r in args.ranks):
        p.error("--ranks must be >= 2")
    args.ranks = list(dict.fromkeys(args.ranks))
    return args


def bench_with_floors(
    size: int,
    label: str,
    names: list[str],
    unsupported: dict[str, str],
    args: argparse.Namespace,
    scratch: Path,
) -> dict[str, Any]:
    """bench_size on `names` less `unsupported` (marked skipped, with why), plus the
    size's best write and read floors."""
    runnable = [n for n in names if n not in unsupported]
    res = bench_size(size, label, runnable, args, scratch)
    res["methods"] = {
        n: res["methods"].get(n)
        or {"runs": [], "skipped": f"skipped: {unsupported[n]}", "info": registry.create(n).info()}
        for n in names
    }
    variants = [n for n in registry.FLOOR_VARIANTS if n in names]
    res["floors"] = best_floors(res, [n for n in variants if n in runnable])
    res["floors"]["variants"] = variants
    res["floors"]["skipped"] = {n: unsupported[n] for n in variants if n in unsupported}
    for kind in ("write", "read"):
        best = res["floors"][kind]
        if best:
            log(
                f"[{label}] best {kind} floor: {best['method']} {best['seconds']:.3f}s "
                f"({best['gb_per_s']:.2f} GB/s)"
            )
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = registry.select(args.methods)
    args.dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    # A private subdirectory: we only ever delete what we created.
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=args.dir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {
        "started": stamp,
        "argv": sys.argv,
        "repeats": args.repeats,
        "methods": names,
        "machine": report.machine_info(scratch),
        "fadvise_check": check_fadvise(scratch),
        "sizes": [],
    }
    if not result["fadvise_check"]["works"]:
        log(
            f"warning: page cache drop did not work here, loads are warm: {result['fadvise_check']}"
        )
    # O_DIRECT floors where the filesystem refuses O_DIRECT (some tmpfs): skipped, with why.
    no_direct = direct_io_unsupported(scratch)
    unsupported = {n: no_direct for n in names if no_direct and n in registry.DIRECT_FLOORS}
    if unsupported:
        log(f"warning: {no_direct}; skipping {', '.join(unsupported)}")
    try:
        for size, label in args.sizes if names else []:
            result["sizes"].append(
                bench_with_floors(size, label, names, unsupported, args, scratch)
            )
        if args.ranks:
            shutdown_dcp()  # the 1-rank group and DCP's daemon are not needed any more
        modes = {"busy": [True], "idle": [False], "both": [True, False]}[args.ranks_mode]
        for world in args.ranks:
            for busy in modes:
                tag = f"[ranks {world} {'busy' if busy else 'idle'}]"
                log(f"{tag} {fmt_bytes(args.ranks_bytes)} in total, starting ranks")
                try:
                    mr = multirank.run(
                        args.ranks_bytes, world, args.repeats, scratch, args.seed, busy
                    )
                    log(f"{tag} {multirank.one_line(mr)}")
                except Exception:
                    mr = {"world": world, "busy": busy, "error": traceback.format_exc()}
                    log(f"{tag} failed\n{mr['error']}")
                result.setdefault("multirank", []).append(mr)
    finally:
        result["machine"]["loadavg_end"] = os.getloadavg()
        shutdown_dcp()
        shutil.rmtree(scratch, ignore_errors=True)
    result["targets"] = targets.targets(result)
    md = report.markdown(result)
    print(md)
    base = args.out / f"bench-{stamp}"
    report.write_json(result, base.with_suffix(".json"))
    (base.with_suffix(".md")).write_text(md)
    plots.write_png(result, base.with_suffix(".png"))
    log(f"wrote {base}.json, .md and .png")
    failed = [n for s in result["sizes"] for n, m in s["methods"].items() if m.get("error")]
    failed += [s["label"] for s in result["sizes"] if "error" in s.get("isolated", {})]
    for mr in result.get("multirank", []):
        if "error" in mr or any(m["n_failed"] for m in mr["summary"].values()):
            failed.append(f"ranks{mr['world']}")
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
