"""scripts/gpu_check.py (`make gpu-check`): the parts that run without a GPU. The real run's
GPU steps are exercised only on a GPU machine; here: the plan's commands parse, the pinned
peer wheels are found or reported, the summary reads back this run's bench rows, the $OUT
file limit is kept, and without a CUDA device the run stops with a FAIL summary."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location(
        "gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_commands_use_the_machine_python_offline(gpu_check, tmp_path):
    steps = gpu_check.commands("/opt/python3", str(tmp_path))
    assert steps["build"][:3] == ["/opt/python3", "-m", "pip"]
    assert {"--no-index", "--no-build-isolation", "--no-deps", "-e"} <= set(steps["build"])
    assert steps["tests"][-1] == "tests" and "gpu" in steps["tests"]
    assert "--preset" in steps["bench"] and "compile" not in steps["bench"]
    assert steps["bench-compile"][steps["bench-compile"].index("--providers") + 1] == "compile"
    assert gpu_check._check_bench(str(tmp_path)).startswith("gpu-goals: 3 losses")


def test_real_run_compiles_triton_kernels_and_records_the_revision(gpu_check, monkeypatch):
    """tests/conftest.py falls back to the interpreter when TRITON_INTERPRET is unset: the
    real run's steps get 0 even where the caller's environment says 1."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    env = gpu_check.run_env("abc1234 (recorded by make gpu-wheels)")
    assert env["TRITON_INTERPRET"] == "0" and env["FASTKD_GIT_REV"] == "abc1234"


def test_pytest_summary_line_is_found(gpu_check):
    out = "....\n=========== 3 failed, 120 passed, 4 skipped in 51.20s ===========\n"
    assert gpu_check.pytest_summary(out) == "3 failed, 120 passed, 4 skipped in 51.20s"
    assert "no pytest summary" in gpu_check.pytest_summary("Killed\n")


def test_peer_wheels_pinned_files_are_found_or_reported(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "WHEELS_DIR", str(tmp_path))
    wheels, problems = gpu_check.peer_wheels()
    assert wheels == [] and len(problems) == 2 and "make gpu-wheels" in problems[0]
    (tmp_path / "liger_kernel-0.8.5-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "liger_kernel-0.8.4-py3-none-any.whl").write_bytes(b"")  # not the pin
    wheels, problems = gpu_check.peer_wheels()
    assert [os.path.basename(w) for w in wheels] == ["liger_kernel-0.8.5-py3-none-any.whl"]
    assert len(problems) == 1 and "cut-cross-entropy==25.1.1" in problems[0]


def test_summary_lists_only_this_runs_bench_rows(gpu_check, tmp_path):
    from fastkd.bench import results_io

    def row(provider, timestamp):
        row = {c: 1 for c in results_io.COLUMNS}
        row.update(loss="distillation", provider=provider, mode="fwd+bwd", dtype="bf16",
                   h_student=0, h_teacher=0, gbps=None, tflops=None, device="GPU",
                   torch="2.11", triton="3.6", git_rev="abc", timestamp=timestamp)
        return row

    results_io.append_rows(str(tmp_path / "gpu.csv"), [row("eager", "2026-01-01T00:00:00Z"),
                                                       row("triton", "2099-01-01T00:00:00Z")])
    table = gpu_check.bench_table(str(tmp_path), started=1.9e9)   # 2030
    assert len(table) == 3 and "| triton |" in table[2] and "eager" not in "".join(table)
    assert gpu_check.bench_table(str(tmp_path), started=4.2e9) == [
        "No bench rows were written by this run."]


def test_out_folder_keeps_at_most_eight_files(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    for name in ("a.csv", "a-ceilings.json", "SUMMARY.md", "gpu-check.md", "gpu-check.log"):
        (tmp_path / name).write_text("x")
    plots = tmp_path / "plots" / "dev"
    plots.mkdir(parents=True)
    for i in range(4):
        (plots / f"p{i}.png").write_bytes(b"png")
    gpu_check.fit_out_dir(str(tmp_path), gpu_check.Log(None))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 6 and (tmp_path / "plots.tar.gz").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_real_run_without_a_gpu_stops_with_a_fail_summary(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.real_run(sys.executable) == 1
    summary = (tmp_path / "gpu-check.md").read_text()
    assert "Overall: **FAIL**" in summary and "| report | FAIL |" in summary
    assert "NO CUDA DEVICE" in summary and (tmp_path / "gpu-check.log").exists()
