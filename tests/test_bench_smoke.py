"""The benchmark harness runs end to end on a tiny state and reports every method.

`python -m benchmarks.run --smoke` (4 MiB, 2 runs) in a subprocess, as a user
would run it; the JSON must hold numeric figures for every registered method.
The fuller variant (fresh-process profile and 2 ranks) is a soak test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _registry() -> list[str]:
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.methods import REGISTRY
    finally:
        sys.path.remove(str(REPO))
    return list(REGISTRY)


def _run(tmp_path: Path, *extra: str, timeout: float) -> dict[str, Any]:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--dir", str(tmp_path / "scratch")]
        + ["--out", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"
    [js] = out.glob("bench-*.json")
    for suffix in (".md", ".png"):
        assert js.with_suffix(suffix).stat().st_size > 0
    assert "| method |" in proc.stdout  # the table is printed
    # Only our private scratch subdirectory was used, and it is gone.
    assert list((tmp_path / "scratch").iterdir()) == []
    return json.loads(js.read_text())


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_methods(result: dict[str, Any]) -> None:
    names = _registry()
    assert result["methods"] == names
    [size] = result["sizes"]
    assert list(size["methods"]) == names
    for name, m in size["methods"].items():
        assert not m.get("error") and not m.get("skipped"), (name, m.get("error"), m.get("skipped"))
        assert len(m["runs"]) == 2, name
        for key in ("return_s", "staged_s", "commit_s"):
            summ = m["summary"][key]
            assert _number(summ["median"]) and summ["median"] >= 0, (name, key, summ)
            assert _number(summ["first"]), (name, key)
        assert _number(m["summary"]["rss_main_peak"]["median"]), name
        if "load_s" in m["runs"][0]:
            assert _number(m["summary"]["load_s"]["median"]), name
        if "probe" in m:
            assert _number(m["probe"]["slowdown"]), name
    ours = {n: m for n, m in size["methods"].items() if n.startswith("async_ckpt")}
    assert ours, "no async_ckpt method registered"
    for name, m in ours.items():
        assert _number(m["summary"]["load_s"]["median"]), name  # every one of ours loads
        if name != "async_ckpt_save":
            assert _number(m["probe"]["slowdown"]), name  # the step probe ran for it
            assert _number(m["summary"]["plan_s"]["median"]), name
    proc = ours["async_ckpt_async_process"]
    assert _number(proc["summary"]["worker_uss_peak"]["median"])
    frozen = ours["async_ckpt_frozen90"]
    assert _number(frozen["ratios"]["staged_vs_all_changed"])
    # skip_unchanged copied only the ~10 % that changed on the second save
    assert frozen["runs"][1]["copied_bytes"] < 0.5 * size["nbytes"]
    assert {t["target"] for t in result["targets"]}


# The timeouts only catch a hung benchmark: about a minute on a quiet 2-core machine,
# it took over 170 s there with every core busy (tests/busy.py).
@pytest.mark.timeout(600)
def test_bench_smoke(tmp_path: Path) -> None:
    _check_methods(_run(tmp_path, timeout=580))


@pytest.mark.soak
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_bench_smoke_isolated_and_ranks(tmp_path: Path) -> None:
    result = _run(tmp_path, "--isolated", "--ranks", "2", timeout=590)
    _check_methods(result)
    iso = result["sizes"][0]["isolated"]
    for key in ("start_s", "main_peak_vs_state_plus_arena", "worker_uss_peak", "sync_save_s"):
        assert _number(iso[key]), key
    runs = result["multirank"]
    assert [(mr["world"], mr["busy"]) for mr in runs] == [(2, True), (2, False)]
    for mr in runs:
        for name, m in mr["summary"].items():
            assert m["n_failed"] == 0, (name, m["errors"])
            assert _number(m["summary"]["all_committed_s"]["median"]), name
        for name in ("async_ckpt_async", "dcp_async", "dcp_async_cached"):
            assert _number(mr["summary"][name]["summary"]["plan_s"]["median"]), name
