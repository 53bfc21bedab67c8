"""``make gpu-check``: the GPU tests and the GPU benchmark in one bounded run (issue 17).

``python -m benchmarks.gpu_check [--size 8GiB] [--budget-s 300]``

* No CUDA device: one line saying so, exit 0 (CI runs it on CPU machines).
* The CPU build of torch on a machine whose ``nvidia-smi`` sees a GPU: says so
  and exits 0; with ``--install-cuda-torch`` it creates ``.venv-gpu``, installs
  the CUDA build of torch (``pip install torch==2.13.0`` from pip's default
  index) and this project there, and runs itself again with that Python.
* Otherwise: ``pytest -m gpu -q`` (time-bounded), then ``benchmarks.gpu_bench``
  in a subprocess with the rest of the budget; prints one table (tests and each
  target of issue 17 with its measured ratio, pass/miss) and writes it as JSON
  to ``benchmarks/results/gpu-<stamp>.json``. Exits 1 only if tests failed
  (or did not finish); a missed target is reported, not an error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_bench import TARGETS
from benchmarks.metrics import fmt_bytes
from benchmarks.sizes import parse_size

REPO = Path(__file__).resolve().parents[1]
GPU_VENV = REPO / ".venv-gpu"
REEXEC_ENV = "ASYNC_CKPT_GPU_CHECK_REEXEC"
TORCH_PIN = "torch==2.13.0"
TESTS_SHARE = 0.4  # of the budget, at most TESTS_MAX_S
TESTS_MAX_S = 150.0
MARGIN_S = 10.0  # left at the end for the table and the JSON


def say(msg: str) -> None:
    print(f"gpu-check: {msg}", flush=True)


# ---------------------------------------------------------------------------- no CUDA


def torch_build() -> str:
    return f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"


def no_cuda_line() -> str:
    return f"gpu-check: no CUDA device here (torch {torch.__version__}, {torch_build()}); nothing to check"


def nvidia_gpu_visible() -> bool:
    """``nvidia-smi -L`` lists a GPU (the driver sees one, whatever torch is installed)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def _venv_torch_cuda(python: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(python), "-c", "import torch; print(torch.version.cuda)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    v = out.stdout.strip()
    return v if out.returncode == 0 and v not in ("", "None") else None


def install_cuda_torch_and_rerun(argv: Sequence[str]) -> int:
    """Make ``.venv-gpu`` with the CUDA build of torch and this project, run there."""
    python = GPU_VENV / "bin" / "python"
    if _venv_torch_cuda(python) is None:
        say(
            f"installing the CUDA build of torch ({TORCH_PIN}, pip's default index) and this "
            f"project into {GPU_VENV.name}/; .venv keeps its CPU build (minutes, a few GB)"
        )
        t0 = time.monotonic()
        steps = [
            [sys.executable, "-m", "venv", str(GPU_VENV)],
            [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
            [str(python), "-m", "pip", "install", "--quiet", TORCH_PIN],
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "-c",
                "constraints.txt",
                "-e",
                ".[dev]",
            ],
        ]
        for cmd in steps:
            if subprocess.run(cmd, cwd=REPO).returncode != 0:
                say(f"install failed: {' '.join(cmd)}; nothing checked")
                return 1
        cuda = _venv_torch_cuda(python)
        say(f"installed in {time.monotonic() - t0:.0f} s: torch with CUDA {cuda}")
        if cuda is None:
            say("pip's default index gave a CPU build of torch here; nothing checked")
            return 1
    else:
        say(f"using {GPU_VENV.name}/ (the CUDA build of torch is installed there)")
    rest = [a for a in argv if a != "--install-cuda-torch"]
    env = dict(os.environ, **{REEXEC_ENV: "1"})
    return subprocess.run(
        [str(python), "-m", "benchmarks.gpu_check", *rest], cwd=REPO, env=env
    ).returncode


def without_cuda(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if torch.version.cuda is None and not os.environ.get(REEXEC_ENV) and nvidia_gpu_visible():
        if args.install_cuda_torch:
            return install_cuda_torch_and_rerun(argv)
        print(
            f"gpu-check: nvidia-smi sees a GPU but torch {torch.__version__} here is the CPU "
            "build; `make gpu-check GPU_CHECK_ARGS=--install-cuda-torch` installs the CUDA "
            f"build into {GPU_VENV.name}/ and checks there; nothing checked"
        )
        return 0
    print(no_cuda_line())
    return 0


# ---------------------------------------------------------------------------- phases


def _run_bounded(cmd: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Run ``cmd`` in its own process group; kill the group at ``timeout``.

    Returns (exit status or None on timeout, stdout+stderr, seconds).
    """
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        log.seek(0)
        return rc, log.read(), time.monotonic() - t0


_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b")


def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line (``3 passed, 1 skipped in 2.0s``)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "deselected": 0}
    lines = [ln for ln in text.strip().splitlines() if _COUNT.search(ln)]
    if lines:
        for n, word in _COUNT.findall(lines[-1]):
            key = "errors" if word.startswith("error") else word
            counts[key] = counts.get(key, 0) + int(n)
    return counts


def run_tests(timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    rc, out, wall = _run_bounded(cmd, timeout)
    counts = parse_pytest_summary(out)
    tests: dict[str, Any] = {"command": " ".join(cmd[2:]), "exit": rc, "wall_s": wall, **counts}
    tests["timed_out"] = rc is None
    # pytest exits 5 when no test was selected: nothing failed.
    tests["ok"] = rc in (0, 5) and counts["failed"] == 0 and counts["errors"] == 0
    tests["tail"] = out[-4000:]
    return tests


def run_bench(args: argparse.Namespace, budget_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.gpu_bench",
            "--size",
            str(args.size),
            "--budget-s",
            f"{max(10.0, budget_s - 15):.0f}",  # its own pacing; the kill below is the bound
            "--dir",
            str(args.dir),
            "--json-out",
            str(out),
        ]
        if args.dry_run_cpu:
            cmd += ["--device", "cpu"]
        rc, log, wall = _run_bounded(cmd, budget_s)
        result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    result.update(exit=rc, timed_out=rc is None, wall_s=wall, log_tail=log[-4000:])
    if rc is None:
        for row in result.get("targets", []):
            if row["result"] == "not measured":
                row["detail"] = "benchmark stopped at the time budget"
    return result


# ---------------------------------------------------------------------------- report


def tests_row(tests: dict[str, Any]) -> dict[str, str]:
    if tests.get("timed_out"):
        measured = f"timed out after {tests['wall_s']:.0f} s"
    else:
        measured = (
            f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped"
        )
    return {
        "check": "pytest -m gpu",
        "measured": measured,
        "target": "no failures",
        "result": "pass" if tests.get("ok") else "FAIL",
    }


def fmt_value(row: dict[str, Any]) -> str:
    v, unit = row["value"], row["unit"]
    if v is None:
        return "—"
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "ms":
        return f"{v:.2f} ms"
    if unit == "%":
        return f"{v:+.1f} %"
    return f"{v:g} {unit}"


def target_row(row: dict[str, Any]) -> dict[str, str]:
    measured = fmt_value(row)
    if row.get("detail"):
        measured = row["detail"] if measured == "—" else f"{measured} ({row['detail']})"
    return {
        "check": row["label"],
        "measured": measured,
        "target": f"{row['op']} {row['limit']:.2f}x"
        if row["unit"] == "x"
        else f"{row['op']} {row['limit']:g} {row['unit']}",
        "result": row["result"],
    }


def default_targets() -> list[dict[str, Any]]:
    """Every target, not measured (for a benchmark that left nothing)."""
    return [
        {"key": k, **spec, "value": None, "result": "not measured", "detail": ""}
        for k, spec in TARGETS.items()
    ]


def render_table(report: dict[str, Any]) -> str:
    """The one table: a header line, then tests and targets as a markdown table."""
    bench = report.get("bench") or {}
    dev = bench.get("device") or {}
    where = dev.get("name") or report.get("gpu", {}).get("name") or "?"
    head = f"gpu-check {report['started']} on {where}, torch {report['torch']}"
    if bench.get("size"):
        head += (
            f"; state {fmt_bytes(bench['size'])} in {bench.get('n_tensors', '?')} tensors"
            f" (asked {fmt_bytes(bench.get('size_requested', bench['size']))}, "
            f"limited by {bench.get('size_limited_by', '?')})"
        )
    if dev.get("device") == "cpu":
        head += "; CPU dry run: the figures mean nothing"
    rows = [tests_row(report["tests"])] if report.get("tests") else []
    rows += [target_row(r) for r in bench.get("targets") or default_targets()]
    lines = [head, "", "| check | measured | target | result |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['measured']} | {r['target']} | {r['result']} |" for r in rows]
    if bench.get("timed_out"):
        lines.append("\nbenchmark stopped at the time budget; figures above are what it had")
    elif bench.get("exit") not in (None, 0):
        lines.append(f"\nbenchmark exited {bench['exit']}; log tail in the JSON")
    return "\n".join(lines)


def exit_status(report: dict[str, Any]) -> int:
    tests = report.get("tests")
    return 1 if tests is not None and not tests.get("ok") else 0


def write_json(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu-{report['started']}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    return path


def gpu_info() -> dict[str, Any]:
    p = torch.cuda.get_device_properties(0)
    return {
        "name": p.name,
        "total_memory": p.total_memory,
        "count": torch.cuda.device_count(),
        "torch_cuda": torch.version.cuda,
    }


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    p.add_argument("--size", type=parse_size, default=parse_size("8GiB"))
    p.add_argument("--budget-s", type=float, default=300.0, help="whole run, seconds")
    p.add_argument("--dir", default=".bench-tmp/gpu", help="scratch directory on the disk")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--no-tests", action="store_true", help="only the benchmark")
    p.add_argument("--install-cuda-torch", action="store_true")
    # The whole flow on the CPU, to check the plumbing where there is no GPU; figures mean nothing.
    p.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dir = str(Path(args.dir).resolve())
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run_cpu:
        return without_cuda(args, argv)
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    report: dict[str, Any] = {
        "started": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "torch": torch.__version__,
        "gpu": {"name": "CPU (dry run)"} if args.dry_run_cpu else gpu_info(),
        "budget_s": args.budget_s,
        "argv": argv,
    }
    try:
        from benchmarks.report import machine_info

        Path(args.dir).mkdir(parents=True, exist_ok=True)
        report["machine"] = machine_info(Path(args.dir))
    except Exception as exc:  # a description we cannot take is no reason to stop
        report["machine"] = {"error": repr(exc)}
    if os.environ.get(REEXEC_ENV):
        report["venv"] = str(GPU_VENV)
        say(f"running in {GPU_VENV.name}/ (CUDA build of torch installed by gpu-check)")
    if not args.no_tests:
        limit = min(TESTS_MAX_S, args.budget_s * TESTS_SHARE)
        say(f"pytest -m gpu (at most {limit:.0f} s)")
        report["tests"] = run_tests(limit)
    left = deadline - time.monotonic() - MARGIN_S
    say(f"benchmark (at most {left:.0f} s, state up to {fmt_bytes(args.size)})")
    report["bench"] = run_bench(args, left) if left > 20 else {"skipped": "no time left"}
    report["wall_s"] = time.monotonic() - t0
    print(render_table(report))
    path = write_json(report, args.out)
    try:
        shown = path.relative_to(REPO)
    except ValueError:
        shown = path
    say(f"{report['wall_s']:.0f} s in all; JSON in {shown}")
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
