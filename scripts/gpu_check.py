"""`make gpu-check`: one-shot validation of fastkd on one CUDA GPU, in at most 8 minutes.

Run from the repository root by scripts/gpu_check.sh with the Python that holds the machine's
own CUDA build of torch (never replaced; nothing is downloaded: the machine may reach no
package index). Steps, each with a time budget inside one overall deadline:

  report   device, driver, torch, triton, nvcc, git revision (printed first)
  build    the CUDA extension, offline, against that torch (pip install --no-build-isolation
           --no-deps --no-index -e .)
  imports  fastkd._C has its CUDA kernels; `auto` resolves to a GPU kernel backend
  tests    pytest -m gpu tests (compiled Triton and CUDA kernels against the float64 oracle)
  peers    the pinned Liger-Kernel and Cut Cross-Entropy wheels from .gpu-wheels/ (made by
           `make gpu-wheels` on a machine with an index), installed --no-deps into a temp dir
  bench    fastkd bench --preset gpu-goals: fastkd backends, eager, Liger-Kernel and CCE first,
           torch.compile in a second pass (its compile time must not cost the other rows)
  summary  gpu-check.md: PASS/FAIL per check, the pytest summary, the bench rows of this run

Everything lands in $OUT when set (the device tool brings back at most 8 files), else in
bench/results/: the device CSV and its ceilings, SUMMARY.md, plots, gpu-check.md and
gpu-check.log. With --dry-run (make gpu-check DRY_RUN=1) nothing runs on a GPU: the plan is
printed and every import, file and option the real run uses is checked; exit 0 when all
checks pass. With --wheels the pinned peer wheels are downloaded into .gpu-wheels/.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS_DIR = os.path.join(ROOT, ".gpu-wheels")
REV_FILE = os.path.join(WHEELS_DIR, "source-rev")
#: import name -> (distribution, pinned version, names the bench providers import from it)
PEERS = {
    "liger_kernel": ("liger-kernel", "0.8.5", ("liger_kernel.transformers",
                                               ("LigerCrossEntropyLoss", "LigerFusedLinearJSD",
                                                "LigerKLDIVLoss"))),
    "cut_cross_entropy": ("cut-cross-entropy", "25.1.1", ("cut_cross_entropy",
                                                          ("linear_cross_entropy",))),
}
DEADLINE_S = 480                     # the whole run, report to summary
BUDGETS = {"build": 240, "tests": 150, "bench": 200, "bench-compile": 120}
SUMMARY_RESERVE_S = 15
BENCH_TIMING = ("--reps", "20", "--warmup", "3")
BENCH_PROVIDERS = "triton,cuda,eager,liger,cce,torch"
MAX_OUT_FILES = 8
GPU_TEST_FILES = ("tests/test_cuda_dense.py", "tests/test_triton_dense.py",
                  "tests/test_gpu_goals.py")


def out_dir() -> str:
    return os.environ.get("OUT") or os.path.join(ROOT, "bench", "results")


def source_rev() -> str:
    """The git revision of this tree; on a machine that got the files without .git, the one
    `make gpu-wheels` (or a dry run) recorded in .gpu-wheels/source-rev."""
    try:
        rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty",
                              "--abbrev=7"], capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        if rev:
            return rev
    except (OSError, subprocess.SubprocessError):
        pass
    if os.path.exists(REV_FILE):
        with open(REV_FILE) as f:
            return f.read().strip() + " (recorded by make gpu-wheels)"
    return "unknown (no git here, no .gpu-wheels/source-rev)"


def record_rev() -> None:
    if os.path.isdir(WHEELS_DIR):
        rev = source_rev()
        if "recorded" not in rev and not rev.startswith("unknown"):
            with open(REV_FILE, "w") as f:
                f.write(rev + "\n")


class Log:
    """Writes to the console and to OUT/gpu-check.log."""

    def __init__(self, path: Optional[str]):
        self.file = open(path, "a") if path else None

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()


def run_step(cmd: List[str], log: Log, timeout: float, env=None) -> Tuple[int, str, float]:
    """Runs `cmd` in its own process group; its output goes to the log (the last 25 lines to
    the console too). Returns (returncode, output, seconds); returncode 124 on timeout."""
    log(f"$ {' '.join(cmd)}   (budget {timeout:.0f} s)")
    start = time.time()
    with tempfile.TemporaryFile("w+") as capture:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=capture, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
        capture.seek(0)
        output = capture.read()
    seconds = time.time() - start
    if log.file:
        log.file.write(output)
    tail = output.rstrip().splitlines()[-25:]
    print("\n".join("    " + line for line in tail), flush=True)
    log(f"-> exit {code} after {seconds:.0f} s" + (" (time budget reached)" if code == 124
                                                   else ""))
    return code, output, seconds


def pytest_summary(output: str) -> str:
    lines = [ln.strip("= ") for ln in output.splitlines()
             if (" passed" in ln or " failed" in ln or " error" in ln or "no tests ran" in ln)
             and (" in " in ln)]
    return lines[-1] if lines else "no pytest summary line (see gpu-check.log)"


def peer_wheels() -> Tuple[List[str], List[str]]:
    """(pinned wheel paths found in .gpu-wheels/, problems)."""
    found, problems = [], []
    for dist, version, _ in PEERS.values():
        pattern = os.path.join(WHEELS_DIR, f"{dist.replace('-', '_')}-{version}-*.whl")
        matches = glob.glob(pattern)
        if not matches:
            problems.append(f"{dist}=={version}: no wheel {os.path.basename(pattern)} in "
                            f"{WHEELS_DIR} (run `make gpu-wheels` where an index is reachable)")
        found += matches[:1]
    return found, problems


def install_peers(python: str, wheels: List[str], target: str, log: Log) -> Optional[str]:
    """Installs the wheels --no-deps into `target` and imports what bench uses from them;
    returns an error text or None."""
    code, output, _ = run_step([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                                target, *wheels], log, 120)
    if code != 0:
        return f"pip install of the peer wheels failed (exit {code})"
    checks = "; ".join(f"from {mod} import {', '.join(names)}"
                       for _, _, (mod, names) in PEERS.values())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        target, os.environ.get("PYTHONPATH")])))
    code, output, _ = run_step([python, "-c", checks], log, 120, env=env)
    return None if code == 0 else f"the peers' APIs used by bench do not import: {output[-300:]}"


def commands(python: str, out: str) -> dict:
    """The commands of the real run's main steps (printed by the dry run)."""
    tests = [python, "-m", "pytest", "-q", "-m", "gpu", "-rfE", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist") is not None:
        tests += ["-n", "4"]      # the float64 oracle and Triton compiles keep CPUs busy
    return {
        "build": [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                  "--no-index", "-e", "."],
        "tests": tests + ["tests"],
        "bench": [python, "-m", "fastkd", "bench", *bench_args(out, BENCH_PROVIDERS, False)],
        "bench-compile": [python, "-m", "fastkd", "bench",
                          *bench_args(out, "compile", True)],
    }


def bench_args(out: str, providers: str, plot: bool) -> List[str]:
    args = ["--preset", "gpu-goals", "--providers", providers, "--out", out, *BENCH_TIMING]
    return args + (["--plot"] if plot else [])


def fit_out_dir(out: str, log: Log) -> None:
    """At most MAX_OUT_FILES files come back from $OUT: pack the plots if there are more."""
    if not os.environ.get("OUT"):
        return
    files = [p for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)
             if os.path.isfile(p)]
    plots = os.path.join(out, "plots")
    if len(files) > MAX_OUT_FILES and os.path.isdir(plots):
        archive = shutil.make_archive(os.path.join(out, "plots"), "gztar", out, "plots")
        shutil.rmtree(plots)
        log(f"{len(files)} files in $OUT: plots packed into {os.path.basename(archive)}")


def run_env(rev: str) -> dict:
    """The environment of the real run's steps: compiled Triton kernels (tests/conftest.py
    falls back to the interpreter when TRITON_INTERPRET is unset) and the recorded revision
    for the bench rows (the copied tree may have no .git)."""
    return dict(os.environ, TRITON_INTERPRET="0", FASTKD_GIT_REV=rev.split()[0])


# --- the real run --------------------------------------------------------------------------

def real_run(python: str) -> int:
    started = time.time()
    out = out_dir()
    os.makedirs(out, exist_ok=True)
    log = Log(os.path.join(out, "gpu-check.log"))
    rev = source_rev()
    env = run_env(rev)
    results: List[Tuple[str, str, float, str]] = []

    def left(step: str) -> float:
        remaining = DEADLINE_S - SUMMARY_RESERVE_S - (time.time() - started)
        return max(5.0, min(BUDGETS.get(step, 60), remaining))

    log(f"fastkd gpu-check {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, git {rev}")
    report = ("import torch, sys; print('python', sys.version.split()[0]); "
              "print('torch', torch.__version__, 'cuda', torch.version.cuda); "
              "print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() "
              "else 'NO CUDA DEVICE');\ntry:\n import triton; print('triton', triton.__version__)"
              "\nexcept Exception as e: print('triton not importable:', e)")
    code, output, secs = run_step([python, "-c", report], log, 60, env=env)
    smi = ""
    if shutil.which("nvidia-smi"):
        smi = run_step(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                        "--format=csv,noheader"], log, 30)[1].strip()
    if shutil.which("nvcc"):
        run_step(["nvcc", "--version"], log, 30)
    header = "\n".join(filter(None, [f"git {rev}", output.strip(),
                                     f"nvidia-smi: {smi}" if smi else ""]))
    if code != 0 or "NO CUDA DEVICE" in output:
        results.append(("report", "FAIL", secs, "no CUDA device or no torch"))
        return finish(log, out, results, header, started)
    results.append(("report", "PASS", secs, header.replace("\n", "; ")))

    build_env = dict(env, MAX_JOBS=str(os.cpu_count() or 8))
    steps = commands(python, out)
    code, output, secs = run_step(steps["build"], log, left("build"), env=build_env)
    results.append(("build", "PASS" if code == 0 else "FAIL", secs,
                    "CUDA extension built" if code == 0 else output.strip()[-300:]))

    probe = ("import torch, fastkd\nfrom fastkd.ops import native\nfrom fastkd._dispatch import "
             "resolve_backend\nx = torch.zeros(2, 8, device='cuda', dtype=torch.bfloat16)\n"
             "print('cuda kernels', native.HAS_CUDA, '| auto ->', resolve_backend('auto', x))\n"
             "assert native.HAS_CUDA, native.MISSING_REASON")
    code, output, secs = run_step([python, "-c", probe], log, 120, env=env)
    results.append(("imports", "PASS" if code == 0 else "FAIL", secs,
                    output.strip().splitlines()[-1] if output.strip() else ""))

    code, output, secs = run_step(steps["tests"], log, left("tests"), env=env)
    results.append(("tests", "PASS" if code == 0 else "FAIL", secs, pytest_summary(output)))

    wheels, problems = peer_wheels()
    site = tempfile.mkdtemp(prefix="fastkd-peers-")
    error = install_peers(python, wheels, site, log) if wheels else None
    detail = "; ".join(problems + ([error] if error else [])) or ", ".join(
        f"{d}=={v}" for d, v, _ in PEERS.values())
    results.append(("peers", "FAIL" if (problems or error) else "PASS", 0.0, detail))
    bench_env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [
        site, env.get("PYTHONPATH")])))

    code, output, secs = run_step(steps["bench"], log, left("bench"), env=bench_env)
    results.append(("bench", "PASS" if code == 0 else "FAIL", secs, _bench_detail(output)))
    code, output, secs = run_step(steps["bench-compile"], log, left("bench-compile"),
                                  env=bench_env)
    results.append(("bench-compile", "PASS" if code == 0 else "FAIL", secs,
                    _bench_detail(output)))
    return finish(log, out, results, header, started)


def _bench_detail(output: str) -> str:
    rows = [ln for ln in output.splitlines() if "row(s) appended" in ln or "nothing was" in ln]
    bad = [ln for ln in output.splitlines() if ln.startswith(("FAILED", "skipped"))]
    return "; ".join(rows[-1:] + bad[:6]) or "see gpu-check.log"


def bench_table(out: str, started: float) -> List[str]:
    """The bench rows this run appended (timestamp at or after its start), as markdown."""
    import csv

    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "*.csv"))):
        with open(path, newline="") as f:
            rows += [r for r in csv.DictReader(f) if r.get("timestamp", "") >= since]
    if not rows:
        return ["No bench rows were written by this run."]
    lines = ["| loss | shape | provider | median ms | p20-p80 ms | % roofline | peak MiB |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        shape = f"N={r['n']} V={r['v']}"
        if r["loss"] == "sparse_distillation":
            shape += f" k={r['h_teacher']}"
        elif r["h_student"] not in ("", "0"):
            shape += f" Hs={r['h_student']} Ht={r['h_teacher']}"
        lines.append(f"| {r['loss']} {r['mode']} {r['dtype']} | {shape} | {r['provider']} | "
                     f"{r['median_ms']} | {r['p20_ms']}-{r['p80_ms']} | "
                     f"{r['roofline_pct'] or '-'} | {r['peak_mem_mb']} |")
    return lines


def finish(log: Log, out: str, results, header: str, started: float) -> int:
    failed = [name for name, status, _, _ in results if status == "FAIL"]
    lines = [f"# fastkd gpu-check, {time.strftime('%Y-%m-%d %H:%M %Z')}", "",
             "```", header, "```", "",
             f"Overall: **{'FAIL' if failed else 'PASS'}** in {time.time() - started:.0f} s "
             f"(budget {DEADLINE_S} s).", "", "| check | result | s | detail |",
             "|---|---|---:|---|"]
    for name, status, secs, detail in results:
        detail = detail.replace("|", "/").replace("\n", " ")[:400]
        lines.append(f"| {name} | {status} | {secs:.0f} | {detail} |")
    lines += ["", *bench_table(out, started), "",
              "All rows: the device CSV and SUMMARY.md beside this file; full output in "
              "gpu-check.log."]
    with open(os.path.join(out, "gpu-check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))
    fit_out_dir(out, log)
    return 1 if failed else 0


# --- the dry run ---------------------------------------------------------------------------

def dry_run(python: str) -> int:
    """Prints the plan and checks what the real run will use; 0 when nothing fails."""
    out = out_dir()
    print("\n\n".join(__doc__.split("\n\n")[1:3]))
    print(f"\nplan: results into {out}; deadline {DEADLINE_S} s; budgets {BUDGETS}")
    for step, cmd in commands(python, out).items():
        print(f"  {step:<13} {' '.join(cmd)}")
    print()
    checks: List[Tuple[str, str, str]] = []

    def check(name: str, fn) -> None:
        try:
            detail = fn() or ""
            status = "WARN" if detail.startswith("WARN") else "PASS"
        except Exception as exc:  # every check reports; none stops the others
            status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
        checks.append((name, status, detail))
        print(f"[{status}] {name}: {detail}", flush=True)

    check("git revision", lambda: (record_rev(), source_rev())[1])
    check("files", lambda: _check_files())
    check("imports", lambda: _check_imports())
    check("bench options", lambda: _check_bench(out))
    check("gpu tests collect", lambda: _check_collect(python))
    check("peer wheels", lambda: _check_peers(python))
    check("build tools", lambda: _check_build_tools())
    failed = [c for c in checks if c[1] == "FAIL"]
    print(f"\ndry run: {len(checks) - len(failed)} of {len(checks)} checks pass"
          + (f"; FAILED: {', '.join(c[0] for c in failed)}" if failed else ""))
    return 1 if failed else 0


def _check_files() -> str:
    needed = ["setup.py", "pyproject.toml", "scripts/gpu_check.sh", *GPU_TEST_FILES]
    missing = [p for p in needed if not os.path.exists(os.path.join(ROOT, p))]
    cuda = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    if missing or not cuda:
        raise FileNotFoundError(f"missing {missing or 'csrc/cuda/*.cu'}")
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        if '"gpu:' not in f.read():
            raise ValueError("pyproject.toml declares no 'gpu' pytest marker")
    return f"{len(needed)} files, {len(cuda)} CUDA sources, marker gpu declared"


def _check_imports() -> str:
    names = ["torch", "triton", "pytest", "fastkd", "fastkd.ops.native", "fastkd.bench.cli",
             "fastkd.bench.presets", "fastkd.bench.providers", "fastkd.bench.plot", "tqdm"]
    for name in names:
        importlib.import_module(name)
    import setuptools

    import fastkd

    major = int(setuptools.__version__.split(".")[0])
    if major < 64:  # the offline editable build (PEP 660) of the real run needs it
        raise ImportError(f"setuptools {setuptools.__version__} < 64: pip install -e fails")
    if not os.path.realpath(fastkd.__file__).startswith(os.path.realpath(ROOT)):
        raise ImportError(f"fastkd imports from {fastkd.__file__}, not this tree")
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return (f"WARN {len(names)} modules and setuptools {setuptools.__version__}; "
                "matplotlib missing here (plots; the GPU image has it)")
    return f"{len(names)} modules, setuptools {setuptools.__version__}, matplotlib"


def _check_bench(out: str) -> str:
    from fastkd.bench import cli, providers

    for providers_arg, plot in ((BENCH_PROVIDERS, False), ("compile", True)):
        args = cli.build_parser().parse_args(bench_args(out, providers_arg, plot))
        assert args.preset == "gpu-goals" and args.reps == int(BENCH_TIMING[1])
    jobs = cli.preset_jobs("gpu-goals")
    for job in jobs:
        assert job.loss in providers.LOSSES, job.loss
        assert set(job.providers) <= set(providers.PROVIDERS), job.providers
    shapes = sum(len(job.shapes) for job in jobs)
    return f"gpu-goals: {len(jobs)} losses, {shapes} shapes; options parse"


def _check_collect(python: str) -> str:
    done = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                           "-p", "no:cacheprovider", "tests"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"pytest --collect-only exit {done.returncode}: "
                           f"{(done.stdout + done.stderr)[-400:]}")
    return lines[-1]


def _check_peers(python: str) -> str:
    wheels, problems = peer_wheels()
    if problems:
        return "WARN " + "; ".join(problems) + " (the real run then skips those providers)"
    site = tempfile.mkdtemp(prefix="fastkd-peers-")
    try:
        error = install_peers(python, wheels, site, Log(None))
    finally:
        shutil.rmtree(site, ignore_errors=True)
    if error:
        raise RuntimeError(error)
    return ", ".join(os.path.basename(w) for w in wheels) + ": install --no-deps and import"


def _check_build_tools() -> str:
    import torch
    from torch.utils import cpp_extension

    tools = [t for t in ("ninja", "nvcc", "nvidia-smi") if shutil.which(t)]
    note = (f"torch {torch.__version__} (cuda {torch.version.cuda}), CUDA_HOME "
            f"{cpp_extension.CUDA_HOME}, on PATH: {', '.join(tools) or 'none'}")
    if torch.version.cuda is None or "nvcc" not in tools:
        return "WARN " + note + " (no CUDA build here: expected without a GPU)"
    return note


# --- wheels --------------------------------------------------------------------------------

def download_wheels(python: str) -> int:
    """Downloads the pinned peer wheels (pure Python) into .gpu-wheels/ for Python 3.12."""
    os.makedirs(WHEELS_DIR, exist_ok=True)
    with open(os.path.join(WHEELS_DIR, ".gitignore"), "w") as f:
        f.write("*\n")
    specs = [f"{dist}=={version}" for dist, version, _ in PEERS.values()]
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "--platform",
           "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64", "-d", WHEELS_DIR,
           *specs]
    print("$ " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd, cwd=ROOT)
    record_rev()
    wheels, problems = peer_wheels()
    print("\n".join(problems) or f"ready in {WHEELS_DIR}: "
          + ", ".join(os.path.basename(w) for w in wheels) + f"; source-rev {source_rev()}")
    return code or (1 if problems else 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="fastkd's one-shot GPU validation.")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and check imports, files and options; no GPU")
    parser.add_argument("--wheels", action="store_true",
                        help="download the pinned peer wheels into .gpu-wheels/")
    args = parser.parse_args(argv)
    python = sys.executable
    print(f"python {python} ({platform.python_version()}), repository {ROOT}", flush=True)
    if args.wheels:
        return download_wheels(python)
    if args.dry_run:
        return dry_run(python)
    return real_run(python)


if __name__ == "__main__":
    sys.exit(main())
