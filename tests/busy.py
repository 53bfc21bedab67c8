"""Run a command (default: the test suite) while CPU hogs keep every core busy.

Tests that synchronise by time instead of on events fail when the machine is
loaded; this reproduces that load on purpose::

    python tests/busy.py                                # pytest -q, one hog per core
    python tests/busy.py --repeat 3 -- python -m pytest -q tests/test_faults.py
    python tests/busy.py --hogs 4 --repeat 5 -- python -m pytest -q -x tests/test_worker.py

The command runs up to ``--repeat`` times and stops at the first failure; the
exit status is that run's (0 when every run passed). The hogs are stopped when
the runs end, also on Ctrl-C or an error, and each hog exits by itself as soon
as this script is gone (it watches its parent), so none outlives the run.

Not named ``test_*.py``: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

# Burns one core until its parent (this script) is gone or it is told to stop.
# It ignores Ctrl-C (the terminal sends it to the whole group): this script stops it.
HOG = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent = int(sys.argv[1])
x = 0
while True:
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        for i in range(10_000):
            x = (x * 1103515245 + i) & 0xFFFFFFFF
    if os.getppid() != parent:
        sys.exit(0)
"""


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def start_hogs(count: int) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", HOG, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for hog in hogs:
        if hog.poll() is None:
            hog.terminate()
    for hog in hogs:
        try:
            hog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            hog.kill()
            hog.wait()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so the finally blocks stop the hogs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [--hogs N] [--repeat K] [-- COMMAND ...]",
    )
    parser.add_argument(
        "--hogs",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU-hog processes to run (default: one per core, %(default)s here)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the command up to K times, stopping at the first failure (default: 1)",
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help=f"the command to run (default: {sys.executable} -m pytest -q)",
    )
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    command = command or [sys.executable, "-m", "pytest", "-q"]
    if args.hogs < 0 or args.repeat < 1:
        parser.error("--hogs must be >= 0 and --repeat >= 1")

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    print(f"busy: load average before: {load_average()}", flush=True)
    hogs = start_hogs(args.hogs)
    results: list[tuple[int, float]] = []
    code = 0
    try:
        time.sleep(1)  # let the hogs get going before the first run
        print(
            f"busy: {args.hogs} CPU hog(s) on {os.cpu_count()} core(s); "
            f"running {args.repeat} time(s): {' '.join(command)}",
            flush=True,
        )
        for run in range(1, args.repeat + 1):
            print(f"busy: run {run}/{args.repeat}, load average {load_average()}", flush=True)
            started = time.monotonic()
            code = subprocess.call(command)
            seconds = time.monotonic() - started
            results.append((code, seconds))
            verdict = "passed" if code == 0 else f"FAILED (exit {code})"
            print(
                f"busy: run {run}/{args.repeat} {verdict} in {seconds:.0f} s, "
                f"load average {load_average()}",
                flush=True,
            )
            if code != 0:
                break
    except KeyboardInterrupt:
        code = 130
        print("busy: interrupted", flush=True)
    finally:
        stop_hogs(hogs)
    passed = sum(1 for c, _ in results if c == 0)
    print(
        f"busy: {passed}/{len(results)} run(s) passed "
        f"({', '.join(f'{c}:{s:.0f}s' for c, s in results) or 'none'}); "
        f"hogs stopped, load average {load_average()}",
        flush=True,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
