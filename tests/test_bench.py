"""The benchmark harness (bench/, installed as fastkd.bench): schema, cost models, statistics,
memory accounting, provider availability and a tiny end-to-end CLI run on CPU. No timing is
asserted; these check that the numbers the harness writes are computed as documented."""

import csv
import json
import math
import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch

import fastkd
from fastkd._dispatch import unavailable_reason
from fastkd.bench import cli, models, providers, report, results_io, timing

EXPECTED_COLUMNS = [
    "loss", "provider", "mode", "dtype", "n", "v", "h_student", "h_teacher", "median_ms",
    "p20_ms", "p80_ms", "peak_mem_mb", "gbps", "tflops", "roofline_pct", "device", "torch",
    "triton", "git_rev", "timestamp",
]


def _row(**overrides):
    row = {c: 1 for c in EXPECTED_COLUMNS}
    row.update(loss="distillation", provider="eager", mode="fwd+bwd", dtype="fp32",
               gbps=None, device="cpu test", torch="x", triton="", git_rev="abc",
               timestamp="2026-12-01T20:00:00Z")
    row.update(overrides)
    return row


# --- schema --------------------------------------------------------------------------------

def test_columns_are_exactly_the_documented_ones():
    assert list(results_io.COLUMNS) == EXPECTED_COLUMNS


def test_append_rows_writes_header_once_and_empty_cells_for_none(tmp_path):
    path = str(tmp_path / "dev.csv")
    results_io.append_rows(path, [_row(median_ms=1.23456789)])
    results_io.append_rows(path, [_row(provider="torch")])
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == EXPECTED_COLUMNS
    assert len(lines) == 3
    first = dict(zip(EXPECTED_COLUMNS, lines[1]))
    assert first["median_ms"] == "1.2346" and first["gbps"] == ""
    assert results_io.format_value(14610.03) == "14610"
    assert results_io.format_value(0.000479412) == "0.00047941"


def test_append_rows_rejects_wrong_keys_and_foreign_files(tmp_path):
    path = str(tmp_path / "dev.csv")
    bad = _row()
    del bad["git_rev"]
    with pytest.raises(ValueError, match="COLUMNS"):
        results_io.append_rows(path, [bad])
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        results_io.append_rows(str(tmp_path / "other.csv"), [_row()])


def test_latest_rows_keeps_the_last_row_per_key():
    rows = [dict(_row(median_ms="1")), dict(_row(median_ms="2")),
            dict(_row(provider="torch", median_ms="3"))]
    rows = [{k: str(v) for k, v in r.items()} for r in rows]
    latest = results_io.latest_rows(rows)
    assert [(r["provider"], r["median_ms"]) for r in latest] == [("eager", "2"), ("torch", "3")]


def test_device_slug_is_file_safe():
    assert results_io.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert results_io.device_slug(torch.device("cpu")).startswith("cpu-")


# --- cost models ---------------------------------------------------------------------------

def test_dense_byte_floor_reads_both_sides_and_writes_the_gradient_once():
    # N=8192, V=128256, bf16 fwd+bwd reads s, t and writes the gradient once: 6.3 GB.
    nbytes = models.dense_bytes("fwd+bwd", 8192, 128256, 2)
    assert nbytes == 3 * 8192 * 128256 * 2 == 6_304_038_912
    assert models.dense_bytes("fwd", 8192, 128256, 2) == 2 * 8192 * 128256 * 2
    assert models.dense_bytes("bwd", 2048, 32000, 4) == 2 * 2048 * 32000 * 4


def test_fused_linear_flop_floor_counts_three_student_matmuls_and_one_teacher():
    flops = models.fused_linear_flops("fwd+bwd", 8192, 128256, 2048, 4096)
    assert flops == 2 * 8192 * 128256 * (3 * 2048 + 4096)
    assert abs(flops / 1e12 - 21.5) < 0.05  # "21.5 TFLOP"
    parts = sum(models.fused_linear_flops(m, 8192, 128256, 2048, 4096) for m in ("fwd", "bwd"))
    assert parts == flops


def test_sparse_bytes_count_teacher_entries_and_indices():
    assert models.sparse_bytes("fwd+bwd", 10, 100, 5, 2) == 2 * 10 * 100 * 2 + 10 * 5 * (2 + 8)


def test_models_reject_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        models.dense_bytes("forward", 1, 1, 4)


class _FixedCeilings:
    def copy_gbps(self):
        return 1000.0

    def matmul_tflops(self, dtype):
        return 500.0


def test_row_metrics_gbps_and_roofline():
    # 6.304 GB in 3 ms = 2101 GB/s; floor at 1000 GB/s is 6.3 ms -> 210.1 % (above roofline
    # only because the ceiling here is fake).
    gbps, tflops, pct = models.row_metrics("distillation", "fwd+bwd", torch.bfloat16, 8192,
                                           128256, 0, 0, 3.0, _FixedCeilings())
    assert tflops is None
    assert gbps == pytest.approx(6_304_038_912 / 3e-3 / 1e9)
    assert pct == pytest.approx(100 * (6_304_038_912 / 1e12) / 3e-3)
    gbps, tflops, pct = models.row_metrics("fused_linear_distillation", "fwd+bwd",
                                           torch.bfloat16, 8192, 128256, 2048, 4096, 50.0,
                                           _FixedCeilings())
    flops = 2 * 8192 * 128256 * (3 * 2048 + 4096)
    assert gbps is None and tflops == pytest.approx(flops / 0.05 / 1e12)
    assert pct == pytest.approx(100 * flops / 500e12 / 0.05)


def test_ceilings_are_read_from_the_cache_file(tmp_path):
    path = tmp_path / "dev-ceilings.json"
    path.write_text(json.dumps({"copy_gbps": 12.5, "matmul_tflops_float32": 0.25}))
    ceilings = models.Ceilings(str(path), torch.device("cpu"))
    assert ceilings.copy_gbps() == 12.5
    assert ceilings.matmul_tflops(torch.float32) == 0.25


# --- statistics ----------------------------------------------------------------------------

def test_quantiles_on_known_values():
    samples = [float(x) for x in range(10, 0, -1)]  # unsorted on purpose
    median, p20, p80 = timing.summarize(samples)
    assert (median, p20, p80) == pytest.approx((5.5, 2.8, 8.2))
    assert timing.quantile([7.0], 0.2) == 7.0


def test_quantiles_match_numpy_linear_interpolation():
    rng = np.random.default_rng(1)
    samples = rng.lognormal(mean=1.0, sigma=0.5, size=37).tolist()
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert timing.quantile(samples, q) == pytest.approx(np.quantile(samples, q))


def test_quantile_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        timing.quantile([], 0.5)
    with pytest.raises(ValueError, match="q"):
        timing.quantile([1.0], 1.5)


def test_rotation_count_exceeds_twice_the_cache():
    assert timing.rotation_count(10 << 20, 32 << 20) == 4  # capped
    assert timing.rotation_count(30 << 20, 32 << 20) == 3
    assert timing.rotation_count(1 << 30, 32 << 20) == 1


# --- memory accounting ---------------------------------------------------------------------

def test_allocation_peak_of_running_sum():
    assert timing.allocation_peak([4, 4, -4, 2, -6]) == 8
    assert timing.allocation_peak([-5, 3]) == 0


def test_cpu_peak_bytes_sees_two_live_tensors():
    mib = 1 << 20
    x = torch.randn(mib // 4)

    def step():
        a = x * 2.0         # 1 MiB
        b = a + 1.0         # 2 MiB live
        del a
        c = b * 3.0         # b and c live: 2 MiB
        del b, c

    peak = timing.cpu_peak_bytes(step)
    assert 2 * mib <= peak < 2 * mib + 64 * 1024


# --- providers -----------------------------------------------------------------------------

def test_skip_reasons_name_the_cause(monkeypatch):
    cpu = torch.device("cpu")
    assert "CUDA" in providers.skip_reason("distillation", "liger", cpu, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET" in providers.skip_reason("distillation", "triton", cpu,
                                                       torch.float32)
    assert providers.skip_reason("distillation", "eager", cpu, torch.float32) is None
    assert providers.skip_reason("distillation", "torch", cpu, torch.float32) is None
    monkeypatch.delattr(fastkd, "sparse_distillation_loss", raising=False)
    assert "does not exist yet" in providers.skip_reason("sparse_distillation", "torch", cpu,
                                                         torch.float32)
    with pytest.raises(ValueError, match="provider"):
        providers.skip_reason("distillation", "nope", cpu, torch.float32)


def test_eager_and_fastkd_providers_compute_the_same_loss():
    # The comparison is only fair if both compute one function: Hinton loss, T=2, alpha=0.5.
    options = providers.LossOptions(2.0, 0.5)
    inputs = providers.make_inputs("distillation", providers.Shape(16, 300), torch.float32,
                                   torch.device("cpu"), options, seed=3)
    eager = providers.build_provider("distillation", "eager", options)(inputs)
    ours = providers.build_provider("distillation", "torch", options)(inputs)
    assert float(ours.detach()) == pytest.approx(float(eager.detach()), rel=1e-5)


def test_make_prepare_times_backward_after_a_fresh_forward():
    options = providers.LossOptions()
    inputs = providers.make_inputs("distillation", providers.Shape(4, 10), torch.float32,
                                   torch.device("cpu"), options)
    fn = providers.build_provider("distillation", "eager", options)
    for mode in ("fwd", "bwd", "fwd+bwd"):
        inputs["student"].grad = torch.full_like(inputs["student"], math.nan)
        providers.make_prepare("distillation", mode, fn)(inputs)()
        grad = inputs["student"].grad
        assert (grad is None) if mode == "fwd" else bool(torch.isfinite(grad).all())


# --- end to end ----------------------------------------------------------------------------

def test_cli_quick_run_writes_rows_and_summary(tmp_path, capsys, monkeypatch):
    slug = results_io.device_slug(torch.device("cpu"))
    # No --out: the results go to ./fastkd-bench of the current directory, never into the
    # installed package; cached ceilings there keep the test from measuring the machine.
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "fastkd-bench"
    out_dir.mkdir()
    (out_dir / f"{slug}-ceilings.json").write_text(json.dumps({"copy_gbps": 10.0}))
    rc = cli.main(["--quick", "--device", "cpu", "--providers", "torch,eager,liger",
                   "--loss", "dense", "--mode", "fwd,fwd+bwd", "--n", "32", "--v", "500",
                   "--reps", "2", "--warmup", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "skipped distillation/liger: liger runs on CUDA GPUs only" in out
    assert "(no row written)" in out
    assert f"4 row(s) appended to {out_dir / (slug + '.csv')}" in out
    with open(out_dir / f"{slug}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == EXPECTED_COLUMNS
    assert sorted((r["provider"], r["mode"]) for r in rows) == [
        ("eager", "fwd"), ("eager", "fwd+bwd"), ("torch", "fwd"), ("torch", "fwd+bwd")]
    before = datetime.now(timezone.utc) - timedelta(minutes=10)
    for r in rows:
        assert (r["loss"], r["dtype"], r["n"], r["v"]) == ("distillation", "fp32", "32", "500")
        assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["peak_mem_mb"]) > 0 and float(r["gbps"]) > 0 and r["tflops"] == ""
        assert float(r["roofline_pct"]) > 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["timestamp"])
        stamp = datetime.strptime(r["timestamp"], "%Y-%m-%dT%H:%M:%SZ")
        assert before <= stamp.replace(tzinfo=timezone.utc) <= datetime.now(timezone.utc)
        assert r["git_rev"]
    # the console table: every line of a case as wide as its header, columns aligned
    table = out.split("distillation fwd fp32 N=32 V=500\n", 1)[1].split("\n\n", 1)[0]
    lines = table.splitlines()
    assert len(lines) == 3 and lines[0].lstrip().startswith("provider")
    ends = [line.index("median ms") + len("median ms") for line in lines[:1]]
    for line in lines[1:]:
        cells = line.split()
        assert line.index(cells[1]) + len(cells[1]) == ends[0], (lines, "median column")
    assert cli.main(["--plot-only"]) == 0
    summary = (out_dir / "SUMMARY.md").read_text()
    assert "### distillation, fwd+bwd, fp32, N=32 V=500" in summary


def test_a_provider_that_cannot_run_says_so_and_writes_nothing(tmp_path, capsys):
    rc = cli.main(["--quick", "--device", "cpu", "--providers", "liger,cce",
                   "--loss", "dense", "--out", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "skipped distillation/liger: liger runs on CUDA GPUs only" in out
    assert "skipped distillation/cce: cce runs on CUDA GPUs only" in out
    assert "nothing was measured: no row written" in out and "appended" not in out
    assert not (tmp_path / "res").exists() or not list((tmp_path / "res").glob("*.csv"))


def test_a_backend_without_a_kernel_for_the_loss_is_skipped_not_failed(tmp_path, capsys,
                                                                        monkeypatch):
    def unavailable(loss, provider, options):
        def fn(inputs):
            raise fastkd.BackendUnavailableError(f"backend {provider!r} has no kernel here")
        return fn

    monkeypatch.setattr(providers, "build_provider", unavailable)
    rc = cli.main(["--quick", "--device", "cpu", "--providers", "torch", "--loss", "sparse",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED" not in out
    assert "skipped sparse_distillation/torch: backend 'torch' has no kernel here" in out
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.parametrize("text,expected", [
    ("dense", ("distillation",)),
    ("sparse", ("sparse_distillation",)),
    ("fused-linear", ("fused_linear_distillation",)),
    ("fused_linear_distillation,dense", ("fused_linear_distillation", "distillation")),
    ("Dense,distillation", ("distillation",)),
    ("all", providers.LOSSES),
])
def test_loss_takes_short_and_long_names(text, expected):
    assert cli.build_parser().parse_args(["--loss", text]).loss == expected


def test_loss_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as done:
        cli.build_parser().parse_args(["--loss", "dense,nope"])
    assert done.value.code == 2
    assert "fused-linear" in capsys.readouterr().err


def test_default_out_is_relative_to_the_current_directory():
    args = cli.build_parser().parse_args([])
    assert args.out == "fastkd-bench"
    assert "./fastkd-bench" in cli.build_parser().format_help()


def test_help_speaks_to_users():
    text = cli.build_parser().format_help().lower()
    for word in ("issue", "design.md", "bench/timing.py", "bench/models.py"):
        assert word not in text
    assert "--loss" in text and "fused-linear" in text


def test_git_rev_falls_back_to_the_build_version(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.delenv("FASTKD_GIT_REV", raising=False)
    expected = "v" + results_io.installed_version()
    assert expected != "vunknown"
    assert results_io.git_rev(str(tmp_path)) == expected        # no repository at all
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    inner = tmp_path / "venv" / "site-packages" / "fastkd"
    inner.mkdir(parents=True)
    assert results_io.git_rev(str(inner)) == expected           # enclosing repo is not ours


def test_git_rev_recorded_in_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKD_GIT_REV", "abc1234-dirty")   # a tree copied without .git
    assert results_io.git_rev(str(tmp_path)) == "abc1234-dirty"


def test_legacy_csv_is_upgraded_with_an_empty_timestamp(tmp_path):
    path = tmp_path / "dev.csv"
    legacy = [c for c in EXPECTED_COLUMNS if c != "timestamp"]
    old = _row()
    del old["timestamp"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(legacy)
        writer.writerow([results_io.format_value(old[c]) for c in legacy])
    results_io.append_rows(str(path), [_row(provider="torch")])
    rows = results_io.read_rows(str(path))
    assert list(rows[0]) == EXPECTED_COLUMNS
    assert [(r["provider"], r["timestamp"]) for r in rows] == [
        ("eager", ""), ("torch", "2026-12-01T20:00:00Z")]


def test_significant_figures_never_print_a_measured_value_as_zero():
    assert report.significant(0.0083199, 3) == "0.00832"
    assert report.significant(14610.03) == "14610"
    assert report.significant(4.76512) == "4.765"
    assert report.significant(None) == "-" and report.significant(float("nan")) == "-"
    assert report.significant(0.0) == "0"


def test_format_table_aligns_columns():
    lines = report.format_table(("name", "ms"), [("a", "1.5"), ("longer", "12345")])
    assert lines == ["  name       ms", "  a         1.5", "  longer  12345"]


def test_compile_forward_peak_memory_is_measured():
    """torch.compile's forward keeps only per-row statistics for the backward (kilobytes):
    the row must hold that measured amount, not 0."""
    options = providers.LossOptions()
    inputs = providers.make_inputs("distillation", providers.Shape(64, 512), torch.float32,
                                   torch.device("cpu"), options)
    fn = providers.build_provider("distillation", "compile", options)
    for mode, floor in (("fwd", 64 * 4), ("fwd+bwd", 64 * 512 * 4)):
        prepare = providers.make_prepare("distillation", mode, fn)
        prepare(inputs)()   # compile outside the measurement
        peak = timing.peak_bytes(prepare, inputs, torch.device("cpu"),
                                 reset=lambda x: providers.clear_grads("distillation", x))
        assert peak >= floor, (mode, peak)
        assert report.significant(peak / 2**20, 3) not in ("0", "0.0", "-")


def test_presets_hold_the_issue_goals():
    cpu = cli.preset_jobs("cpu-goals")
    dense = cpu[0]
    assert (dense.loss, dense.modes, dense.dtypes, dense.shapes) == (
        "distillation", ("fwd+bwd",), (torch.float32,), (providers.Shape(2048, 32000),))
    assert set(dense.providers) == {"eager", "compile", "cpu", "torch"}
    assert cpu[1].shapes == (providers.Shape(8192, 32000, 256, 256),)
    gpu = {job.loss: job for job in cli.preset_jobs("gpu-goals")}
    bf16 = (torch.bfloat16,)
    assert gpu["distillation"].shapes == (providers.Shape(8192, 128256),)
    assert {"liger", "eager", "compile", "triton", "cuda"} <= set(
        gpu["distillation"].providers)
    assert gpu["fused_linear_distillation"].shapes == tuple(
        providers.Shape(n, 128256, 2048, 4096) for n in (1024, 4096, 8192))
    assert {"liger", "cce"} <= set(gpu["fused_linear_distillation"].providers)
    assert gpu["sparse_distillation"].shapes == (providers.Shape(8192, 128256, k=64),)
    assert all(job.dtypes == bf16 and job.modes == ("fwd+bwd",) for job in gpu.values())


def test_cpu_roofline_sweep_writes_rows_against_its_own_copy_probe(tmp_path, capsys):
    """bench/cpu_roofline.py: one row per (variant, N) whose roofline % is 1.5 copies over
    the step time, both measured in the run, plus the plot."""
    from fastkd.bench import cpu_roofline

    reason = unavailable_reason("cpu", torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(reason)
    assert cpu_roofline.main(["--n", "8,16", "--v", "300", "--reps", "2", "--warmup", "0",
                              "--out", str(tmp_path)]) == 0
    [csv_path] = tmp_path.glob("*.csv")
    rows = list(csv.DictReader(open(csv_path)))
    assert [(r["variant"], r["n"]) for r in rows] == [
        ("fresh", "8"), ("inplace", "8"), ("fresh", "16"), ("inplace", "16")]
    for r in rows:
        step, copy = float(r["step_ms"]), float(r["copy_ms"])
        assert step > 0 and copy > 0
        assert float(r["floor_ms"]) == pytest.approx(1.5 * copy, rel=1e-3)
        # Four significant figures per time, the percentage to 0.1.
        assert float(r["roofline_pct"]) == pytest.approx(100 * 1.5 * copy / step, rel=2e-3,
                                                         abs=0.051)
        assert r["git_rev"] and r["device"] and r["timestamp"].endswith("Z")
    printed = capsys.readouterr().out
    assert "of roofline" in printed
    assert list(tmp_path.glob("*.png")) or "matplotlib is not installed" in printed


def test_git_rev_of_this_checkout_through_the_fastkd_bench_link(monkeypatch):
    # `python -m fastkd.bench...` imports results_io through the fastkd/bench symlink; the
    # revision must still be the checkout's HEAD, not the build version.
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        pytest.skip("not a git checkout (a copied tree): the fallback is tested above")
    monkeypatch.delenv("FASTKD_GIT_REV", raising=False)
    head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert os.path.realpath(results_io.REPO_ROOT) == os.path.realpath(root)
    assert results_io.git_rev().split("+")[0] == head
