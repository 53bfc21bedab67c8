"""`make gpu-check` (issue 17): the CPU-machine behaviour, the target arithmetic and the report.

Without CUDA the check says so in one line and exits 0; the target functions
turn synthetic measurements into pass/miss rows; the table and the JSON are
built from them; a CPU dry run drives the whole flow (tests skipped, the
benchmark on the CPU) at a tiny size. The ``gpu`` test runs the real benchmark
on CUDA at a tiny size and checks that every phase ran and every round trip
was exact (the ratios at that size mean nothing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import gpu_bench, gpu_check  # noqa: E402

sys.path.remove(str(REPO))

MiB = 1 << 20


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------------------- no CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    proc = _run("benchmarks.gpu_check")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    if shutil.which("nvidia-smi") and torch.version.cuda is None:
        assert "--install-cuda-torch" in lines[0]  # a GPU machine with the CPU build
    else:
        assert lines[0] == (
            f"gpu-check: no CUDA device here (torch {torch.__version__}, "
            f"{gpu_check.torch_build()}); nothing to check"
        )
    assert not list((REPO / "benchmarks" / "results").glob("gpu-*.json.tmp"))


def test_cpu_build_on_a_gpu_machine_says_how_to_install_and_installs_nothing(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.setattr(gpu_check.torch.version, "cuda", None)
    monkeypatch.setattr(gpu_check, "nvidia_gpu_visible", lambda: True)
    monkeypatch.setattr(gpu_check, "GPU_VENV", tmp_path / ".venv-gpu")
    monkeypatch.delenv(gpu_check.REEXEC_ENV, raising=False)
    args = gpu_check.parse_args([])
    assert gpu_check.without_cuda(args, []) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "CPU build" in out[0] and "--install-cuda-torch" in out[0]
    assert not (tmp_path / ".venv-gpu").exists()

    # Re-run from .venv-gpu and still no CUDA: the plain line, no second install.
    monkeypatch.setenv(gpu_check.REEXEC_ENV, "1")
    assert gpu_check.without_cuda(gpu_check.parse_args(["--install-cuda-torch"]), []) == 0
    assert capsys.readouterr().out.startswith("gpu-check: no CUDA device here")
    assert not (tmp_path / ".venv-gpu").exists()


# ---------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("row", "result"),
    [
        (gpu_bench.d2h_target([1.05, 1.04, 1.06], [1.0, 1.0, 1.0]), "pass"),
        (gpu_bench.d2h_target([1.10], [1.0]), "pass"),  # the limit itself passes (<=)
        (gpu_bench.d2h_target([1.30, 1.25], [1.0, 1.0]), "miss"),
        (gpu_bench.control_back_target([0.0012, 0.0009, 0.004]), "pass"),
        (gpu_bench.control_back_target([0.005, 0.006, 0.004]), "miss"),  # 5 ms is not < 5
        (gpu_bench.slowdown_target([0.010] * 10, [0.0102] * 10), "pass"),
        (gpu_bench.slowdown_target([0.010] * 10, [0.0105] * 10), "miss"),
        (gpu_bench.load_target([2.2], [1.5], [0.5]), "pass"),
        (gpu_bench.load_target([2.4], [1.5], [0.5]), "miss"),
        (gpu_bench.bitexact_target({"bfloat16": "ok", "float8_e4m3fn": "ok"}), "pass"),
        (gpu_bench.bitexact_target({"bfloat16": "ok", "float8_e5m2": "mismatch"}), "miss"),
        (gpu_bench.d2h_target([], []), "not measured"),
        (gpu_bench.slowdown_target([], [0.01]), "not measured"),
        (gpu_bench.bitexact_target({}), "not measured"),
    ],
)
def test_targets_from_synthetic_measurements(row, result):
    assert row["result"] == result, row


def test_target_values_are_the_ratios_of_the_medians():
    assert gpu_bench.d2h_target([3.0, 1.2, 1.1], [1.0, 2.0, 1.0])["value"] == pytest.approx(1.2)
    assert gpu_bench.control_back_target([0.001, 0.003, 0.002])["value"] == pytest.approx(2.0)
    slow = gpu_bench.slowdown_target([0.01, 0.01], [0.0101, 0.0103])
    assert slow["value"] == pytest.approx(2.0)
    # the floor of a round is its read plus its H2D copy
    assert gpu_bench.load_target([2.0, 2.2, 2.1], [1.0, 1.1, 1.2], [0.5, 0.5, 0.5])[
        "value"
    ] == pytest.approx(2.1 / 1.6)
    warm = gpu_bench.load_target([1.0], [1.0], [0.1], cached=[0.0, 0.6])
    assert "NOT cold" in warm["detail"]
    assert "NOT cold" not in gpu_bench.load_target([1.0], [1.0], [0.1], [0.0])["detail"]
    bad = gpu_bench.bitexact_target({"a": "ok", "b": "mismatch", "c": "StateDictError: x"})
    assert (
        bad["value"] == 2
        and "1/3 dtypes exact" in bad["detail"]
        and "b (mismatch)" in bad["detail"]
    )


def test_all_targets_names_why_a_phase_has_no_figures():
    phases = {
        "staging_sync": {"error": "RuntimeError: boom"},
        "staging_async": {"return_s": [0.001]},
        "training": {"skipped": "skipped: 3 s left of the budget, needs ~40"},
        "dtypes": {"per_dtype": {"bfloat16": "ok"}},
    }
    rows = {r["key"]: r for r in gpu_bench.all_targets(phases)}
    assert list(rows) == list(gpu_bench.TARGETS)
    assert rows["d2h_staging"]["result"] == "not measured"
    assert rows["d2h_staging"]["detail"] == "RuntimeError: boom"
    assert rows["control_back"]["result"] == "pass"
    assert rows["step_slowdown"]["detail"].startswith("skipped:")
    assert rows["load"]["result"] == "not measured"
    assert rows["bitexact"]["result"] == "pass"


# ---------------------------------------------------------------------------- sizing, state


def test_size_is_scaled_down_to_the_tightest_limit():
    GiB = 1 << 30
    big = dict(host_available=512 * GiB, disk_free=1024 * GiB, disk_bytes_per_s=None, time_s=200)
    assert gpu_bench.choose_size(8 * GiB, gpu_free=139 * GiB, **big) == (8 * GiB, "requested")
    size, why = gpu_bench.choose_size(8 * GiB, gpu_free=12 * GiB, **big)
    assert why == "GPU memory" and size == 4 * GiB  # (12 - 4) / 2
    size, why = gpu_bench.choose_size(
        8 * GiB, gpu_free=139 * GiB, host_available=20 * GiB, disk_free=1024 * GiB,
        disk_bytes_per_s=None, time_s=200,
    )  # fmt: skip
    assert why == "host memory" and size == 4 * GiB
    size, why = gpu_bench.choose_size(
        8 * GiB, gpu_free=139 * GiB, host_available=512 * GiB, disk_free=1024 * GiB,
        disk_bytes_per_s=0.5e9, time_s=200,
    )  # fmt: skip
    assert why == "time budget" and size < 8 * GiB and size % MiB == 0
    assert gpu_bench.choose_size(8 * GiB, gpu_free=1 * GiB, **big)[0] == gpu_bench.MIN_SIZE


@pytest.mark.parametrize("nbytes", [16 * MiB, 100 * MiB + 12345, 8 << 30])
def test_tensor_plan_is_300_tensors_of_the_size(nbytes):
    plan = gpu_bench.tensor_plan(nbytes)
    assert len(plan) == gpu_bench.N_TENSORS
    sizes = [nb for _, _, nb in plan]
    assert all(nb % gpu_bench.ALIGN == 0 and nb > 0 for nb in sizes)
    assert sum(sizes) == nbytes // gpu_bench.ALIGN * gpu_bench.ALIGN
    assert {d for _, d, _ in plan} == {torch.bfloat16, torch.float32}
    assert len({name for name, _, _ in plan}) == len(plan)


def test_state_is_reproducible_and_mismatches_are_found():
    plan = gpu_bench.tensor_plan(16 * MiB)
    state = gpu_bench.make_state(plan, torch.device("cpu"))
    assert gpu_bench.state_mismatches(state, plan) == []
    name = plan[7][0]
    state[name].view(-1).view(torch.uint8)[3] += 1  # a bit flip (random bf16 may be NaN)
    assert gpu_bench.state_mismatches(state, plan) == [name]


def test_round_trip_dtypes_cover_bf16_float8_and_complex():
    names = {str(d).removeprefix("torch.") for d in gpu_bench.round_trip_dtypes()}
    assert {"bfloat16", "float16", "float32", "float64", "bool", "complex64", "int64"} <= names
    assert {n for n in dir(torch) if n.startswith("float8_")} <= names
    assert not any(n.startswith(("bits", "q")) for n in names)


# ---------------------------------------------------------------------------- report


def _report(tests_ok: bool = True, bench: dict[str, Any] | None = None) -> dict[str, Any]:
    phases = {
        "staging_sync": {"staged_s": [0.172, 0.170], "floor_s": [0.160, 0.161]},
        "staging_async": {"return_s": [0.0012, 0.0015]},
        "training": {"alone_step_s": [0.0065] * 20, "during_step_s": [0.0069] * 20},
        "load": {"load_s": [3.0], "read_s": [2.5], "h2d_s": [0.2]},
        "dtypes": {"per_dtype": {"bfloat16": "ok", "float8_e4m3fn": "ok"}},
    }
    return {
        "started": "20270101-000000",
        "torch": "2.13.0+cu128",
        "gpu": {"name": "NVIDIA H200"},
        "tests": {
            "passed": 5 if tests_ok else 4,
            "failed": 0 if tests_ok else 1,
            "errors": 0,
            "skipped": 0,
            "ok": tests_ok,
            "timed_out": False,
            "wall_s": 30.0,
        },
        "bench": bench
        if bench is not None
        else {
            "device": {"device": "cuda", "name": "NVIDIA H200"},
            "size": 8 << 30,
            "size_requested": 8 << 30,
            "size_limited_by": "requested",
            "n_tensors": 300,
            "targets": gpu_bench.all_targets(phases),
            "exit": 0,
        },
    }


def test_table_has_the_tests_and_every_target_with_its_result():
    table = gpu_check.render_table(_report())
    lines = table.splitlines()
    assert lines[0].startswith("gpu-check 20270101-000000 on NVIDIA H200, torch 2.13.0+cu128")
    assert "state 8 GiB in 300 tensors" in lines[0]
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| check")]
    assert len(rows) == 1 + len(gpu_bench.TARGETS)
    assert (
        rows[0]
        == "| pytest -m gpu | 5 passed, 0 failed, 0 errors, 0 skipped | no failures | pass |"
    )
    by_label = {r.split(" | ")[0].removeprefix("| "): r for r in rows}
    d2h = by_label[gpu_bench.TARGETS["d2h_staging"]["label"]]
    assert "1.07x" in d2h and "<= 1.10x" in d2h and d2h.endswith("| pass |")
    assert "1.35 ms" in by_label[gpu_bench.TARGETS["control_back"]["label"]]
    slow = by_label[gpu_bench.TARGETS["step_slowdown"]["label"]]
    assert "+6.2 %" in slow and slow.endswith("| miss |")
    load = by_label[gpu_bench.TARGETS["load"]["label"]]
    assert "1.11x" in load and load.endswith("| pass |")
    assert "2/2 dtypes exact" in by_label[gpu_bench.TARGETS["bitexact"]["label"]]


def test_exit_status_is_1_only_when_tests_failed():
    assert gpu_check.exit_status(_report(tests_ok=True)) == 0
    assert gpu_check.exit_status(_report(tests_ok=False)) == 1
    missed = _report(bench={"targets": [gpu_bench.d2h_target([2.0], [1.0])], "exit": 0})
    assert gpu_check.exit_status(missed) == 0  # a missed target is reported, not an error
    assert "FAIL" in gpu_check.render_table(_report(tests_ok=False))


def test_a_benchmark_that_left_nothing_lists_every_target_not_measured():
    table = gpu_check.render_table(_report(bench={"timed_out": True, "exit": None}))
    assert table.count("| not measured |") == len(gpu_bench.TARGETS)
    assert "stopped at the time budget" in table


def test_json_is_written_under_the_results_dir(tmp_path):
    report = _report()
    path = gpu_check.write_json(report, tmp_path / "results")
    assert path == tmp_path / "results" / "gpu-20270101-000000.json"
    back = json.loads(path.read_text())
    assert [r["key"] for r in back["bench"]["targets"]] == list(gpu_bench.TARGETS)
    assert not list((tmp_path / "results").glob("*.tmp"))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("....\n3 passed, 2 skipped, 900 deselected in 4.1s\n", (3, 0, 0, 2)),
        ("F.\nFAILED tests/x.py::t\n1 failed, 1 passed, 1 error in 2s\n", (1, 1, 1, 0)),
        ("\n900 deselected in 3.0s\n", (0, 0, 0, 0)),
        ("", (0, 0, 0, 0)),
    ],
)
def test_pytest_summary_is_parsed(text, want):
    c = gpu_check.parse_pytest_summary(text)
    assert (c["passed"], c["failed"], c["errors"], c["skipped"]) == want


# ---------------------------------------------------------------------------- whole flow


def test_cpu_dry_run_drives_every_phase_and_writes_the_json(tmp_path):
    """The benchmark's code on the CPU (no pinning, no streams), through gpu_check."""
    out = tmp_path / "results"
    proc = _run(
        "benchmarks.gpu_check",
        "--dry-run-cpu",
        "--no-tests",
        "--size",
        "16MiB",
        "--budget-s",
        "100",
        "--dir",
        str(tmp_path / "scratch"),
        "--out",
        str(out),
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPU dry run" in proc.stdout and "| check | measured | target | result |" in proc.stdout
    (path,) = out.glob("gpu-*.json")
    bench = json.loads(path.read_text())["bench"]
    assert bench["exit"] == 0, bench["log_tail"]
    for name, phase in bench["phases"].items():
        assert "error" not in phase and "skipped" not in phase, (name, phase)
    rows = {r["key"]: r for r in bench["targets"]}
    assert all(r["value"] is not None for r in rows.values()), rows
    assert rows["bitexact"]["result"] == "pass", rows["bitexact"]
    assert bench["phases"]["load"]["state_mismatches_after_load"] == []
    assert not list((tmp_path / "scratch").iterdir())  # every checkpoint removed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_benchmark_runs_at_a_tiny_size(tmp_path):
    """Every phase on CUDA at 64 MiB; exact round trips (the ratios mean nothing here)."""
    out = tmp_path / "bench.json"
    proc = _run(
        "benchmarks.gpu_bench",
        "--size",
        "64MiB",
        "--repeats",
        "1",
        "--budget-s",
        "90",
        "--matmul-dim",
        "2048",
        "--dir",
        str(tmp_path / "scratch"),
        "--json-out",
        str(out),
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["device"]["device"] == "cuda"
    for name, phase in result["phases"].items():
        assert "error" not in phase and "skipped" not in phase, (name, phase)
    rows = {r["key"]: r for r in result["targets"]}
    assert all(r["value"] is not None for r in rows.values()), rows
    assert rows["bitexact"]["result"] == "pass", rows["bitexact"]["detail"]
    assert result["phases"]["load"]["state_mismatches_after_load"] == []
