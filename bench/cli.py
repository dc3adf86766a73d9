"""`fastkd bench`: time distillation losses across providers, append rows to the results CSV.

Examples:
    fastkd bench --quick                                   # tiny CPU smoke run
    fastkd bench --preset cpu-goals --plot                 # issue 3 / 4 CPU goals
    fastkd bench --preset gpu-goals --plot                 # GPU goals (needs a CUDA device)
    fastkd bench --loss distillation --v 32000,128256,262144 --n 8192 --dtype bf16 \\
        --mode fwd,bwd,fwd+bwd --plot                      # a V sweep on a GPU
    fastkd bench --plot-only                               # re-render PNGs + SUMMARY.md

Modes: `fwd` times the forward of a training step (inputs require grad, so fused kernels that
produce the gradient in their forward pay for it here); `bwd` times `loss.backward()` after an
untimed forward; `fwd+bwd` times both. Rows go to `<out>/<device-slug>.csv` as each one is
measured; see bench/timing.py for the timing and memory methods, bench/models.py for the byte
and FLOP models and ceilings.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from . import models, providers, results_io, timing
from .providers import LossOptions, Shape

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PRESETS = ("cpu-goals", "gpu-goals")


@dataclass(frozen=True)
class Job:
    """One loss over a set of providers, modes, dtypes and shapes."""

    loss: str
    providers: tuple
    modes: tuple
    dtypes: tuple
    shapes: tuple
    options: LossOptions = LossOptions()


def preset_jobs(name: str) -> List[Job]:
    """The goal measurements of issues 2-4 (Hinton loss with target, T=2, alpha=0.5)."""
    fp32, bf16 = (torch.float32,), (torch.bfloat16,)
    if name == "cpu-goals":
        return [
            Job("distillation", ("eager", "compile", "cpu", "torch"), ("fwd+bwd",), fp32,
                (Shape(2048, 32000),)),
            Job("fused_linear_distillation", ("eager", "cpu", "torch"), ("fwd+bwd",), fp32,
                (Shape(8192, 32000, 256, 256),)),
        ]
    if name == "gpu-goals":
        return [
            Job("distillation", ("triton", "cuda", "torch", "eager", "compile", "liger"),
                ("fwd+bwd",), bf16, (Shape(8192, 128256),)),
            Job("fused_linear_distillation",
                ("triton", "cuda", "torch", "eager", "compile", "liger", "cce"),
                ("fwd+bwd",), bf16, (Shape(8192, 128256, 2048, 4096),)),
        ]
    raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")


# --- argument parsing ---------------------------------------------------------------------

def _int_list(text: str) -> tuple:
    values = tuple(int(x) for x in text.split(",") if x.strip())
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choice_list(text: str, choices: Sequence[str], name: str) -> tuple:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    if values == ("all",):
        return tuple(choices)
    bad = [x for x in values if x not in choices]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{name} must be from {tuple(choices)}, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastkd bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, help="run a goal preset (ignores shape options)")
    p.add_argument("--loss", type=lambda s: _choice_list(s, providers.LOSSES, "--loss"),
                   help=f"comma list from {providers.LOSSES} or 'all' (default distillation; "
                        "with --preset, keeps only the preset's jobs for these losses)")
    p.add_argument("--providers", type=lambda s: _choice_list(s, providers.PROVIDERS,
                                                              "--providers"),
                   help="comma list (default: every provider for the device; CPU: "
                        f"{','.join(providers.CPU_PROVIDERS)})")
    p.add_argument("--n", type=_int_list, help="tokens, comma list (CPU 2048, GPU 8192)")
    p.add_argument("--v", type=_int_list, help="vocabulary, comma list (CPU 32000, GPU 128256)")
    p.add_argument("--hs", type=_int_list, help="student hidden size, fused-linear (256 / 2048)")
    p.add_argument("--ht", type=_int_list, help="teacher hidden size, fused-linear (256 / 4096)")
    p.add_argument("--k", type=_int_list, help="teacher top-k, sparse loss (default 64)")
    p.add_argument("--dtype", type=lambda s: _choice_list(s, list(DTYPES), "--dtype"),
                   help="comma list of fp32, bf16, fp16 (CPU fp32, GPU bf16)")
    p.add_argument("--mode", default=("fwd+bwd",),
                   type=lambda s: _choice_list(s, models.MODES, "--mode"),
                   help="comma list of fwd, bwd, fwd+bwd, or all (default fwd+bwd)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--reps", type=int, help="timed repetitions (CPU 10, GPU 50, quick 3)")
    p.add_argument("--warmup", type=int, help="untimed repetitions first (CPU 2, GPU 5)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (N=256, V=4096, H=64, k=16) and 3 repetitions")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--plot", action="store_true",
                   help="after the run, render PNGs and SUMMARY.md from the results folder")
    p.add_argument("--plot-only", action="store_true", help="only render PNGs and SUMMARY.md")
    p.add_argument("--remeasure-ceilings", action="store_true",
                   help="measure copy bandwidth / matmul rate again instead of the cached ones")
    p.add_argument("--seed", type=int, default=0)
    return p


def _shapes(loss: str, args, gpu: bool) -> tuple:
    quick = args.quick
    ns = args.n or ((256,) if quick else (8192,) if gpu else (2048,))
    vs = args.v or ((4096,) if quick else (128256,) if gpu else (32000,))
    if loss == "fused_linear_distillation":
        hss = args.hs or ((64,) if quick else (2048,) if gpu else (256,))
        hts = args.ht or ((64,) if quick else (4096,) if gpu else (256,))
        return tuple(Shape(n, v, hs, ht) for n in ns for v in vs for hs in hss for ht in hts)
    if loss == "sparse_distillation":
        ks = args.k or ((16,) if quick else (64,))
        return tuple(Shape(n, v, k=k) for n in ns for v in vs for k in ks if k <= v)
    return tuple(Shape(n, v) for n in ns for v in vs)


def jobs_from_args(args, device: torch.device) -> List[Job]:
    if args.preset:
        jobs = preset_jobs(args.preset)
        if args.loss:
            jobs = [j for j in jobs if j.loss in args.loss]
        if args.providers:
            jobs = [Job(j.loss, tuple(p for p in j.providers if p in args.providers), j.modes,
                        j.dtypes, j.shapes, j.options) for j in jobs]
        return jobs
    gpu = device.type == "cuda"
    dtypes = tuple(dict.fromkeys(DTYPES[d] for d in (args.dtype or ("bf16" if gpu else "fp32",))))
    chosen = args.providers or providers.default_providers(device)
    options = LossOptions(args.temperature, args.alpha)
    return [Job(loss, chosen, args.mode, dtypes, _shapes(loss, args, gpu), options)
            for loss in (args.loss or ("distillation",))]


# --- running ------------------------------------------------------------------------------

@dataclass
class Context:
    device: torch.device
    csv_path: str
    ceilings: models.Ceilings
    reps: int
    warmup: int
    seed: int
    provenance: Dict[str, str]


def _input_sets(job: Job, shape: Shape, dtype, ctx: Context) -> list:
    first = providers.make_inputs(job.loss, shape, dtype, ctx.device, job.options, ctx.seed)
    count = 1
    if ctx.device.type == "cpu":  # GPU runs flush L2 instead (timing.time_cuda)
        count = timing.rotation_count(providers.inputs_nbytes(first),
                                      timing.last_level_cache_bytes())
    return [first] + [providers.make_inputs(job.loss, shape, dtype, ctx.device, job.options,
                                            ctx.seed + i) for i in range(1, count)]


def measure(job: Job, provider: str, mode: str, fn, sets: list, shape: Shape, dtype,
            ctx: Context) -> Dict[str, object]:
    """Times one (provider, mode) and returns its CSV row."""
    prepare = providers.make_prepare(job.loss, mode, fn)
    timer = timing.time_cuda if ctx.device.type == "cuda" else timing.time_cpu
    samples = timer(prepare, sets, ctx.reps, ctx.warmup)
    median, p20, p80 = timing.summarize(samples)
    peak = timing.peak_bytes(prepare, sets[0], ctx.device,
                             reset=lambda x: providers.clear_grads(job.loss, x))
    hs, ht = hidden_columns(job.loss, shape)
    gbps, tflops, pct = models.row_metrics(job.loss, mode, dtype, shape.n, shape.v, hs, ht,
                                           median, ctx.ceilings)
    row = dict(loss=job.loss, provider=provider, mode=mode, dtype=DTYPE_NAMES[dtype],
               n=shape.n, v=shape.v, h_student=hs, h_teacher=ht, median_ms=median,
               p20_ms=p20, p80_ms=p80, peak_mem_mb=peak / 2**20, gbps=gbps, tflops=tflops,
               roofline_pct=pct, **ctx.provenance)
    results_io.append_rows(ctx.csv_path, [row])
    return row


class Report:
    """Rows measured, providers skipped (with reasons), failures, loss values."""

    def __init__(self):
        self.rows: List[Dict[str, object]] = []
        self.skipped: Dict[tuple, str] = {}
        self.failed: List[str] = []
        self.values: Dict[tuple, float] = {}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def hidden_columns(loss: str, shape: Shape) -> tuple:
    """(h_student, h_teacher) columns: hidden sizes, or (0, k) for the sparse loss."""
    return (0, shape.k) if loss == "sparse_distillation" else (shape.hs, shape.ht)


def _value_key(loss, dtype_name, n, v, hs, ht, provider) -> tuple:
    return (loss, dtype_name, n, v, hs, ht, provider)


def run_provider(job, provider, sets, shape, dtype, ctx, report, bar) -> None:
    key = _value_key(job.loss, DTYPE_NAMES[dtype], shape.n, shape.v,
                     *hidden_columns(job.loss, shape), provider)
    try:
        fn = providers.build_provider(job.loss, provider, job.options)
        # One forward (graph kept, as in training) for the printed loss value: a sanity
        # check that providers compute the same function (peers' equivalents differ).
        report.values[key] = float(fn(sets[0]).detach().float())
    except Exception as exc:
        report.failed.append(f"{job.loss}/{provider}: {type(exc).__name__}: {exc}")
        bar.update(len(job.modes))
        return
    for mode in job.modes:
        bar.set_description(f"{job.loss}/{provider}/{mode}")
        try:
            report.rows.append(measure(job, provider, mode, fn, sets, shape, dtype, ctx))
        except Exception as exc:
            report.failed.append(f"{job.loss}/{provider}/{mode}: {type(exc).__name__}: {exc}")
        bar.update(1)
        _release(ctx.device)


def run_jobs(jobs: List[Job], ctx: Context) -> Report:
    from tqdm import tqdm

    report = Report()
    total = sum(len(j.providers) * len(j.modes) * len(j.dtypes) * len(j.shapes) for j in jobs)
    with tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True) as bar:
        for job in jobs:
            for shape in job.shapes:
                for dtype in job.dtypes:
                    runnable = []
                    for provider in job.providers:
                        reason = providers.skip_reason(job.loss, provider, ctx.device, dtype)
                        if reason is None:
                            runnable.append(provider)
                            continue
                        report.skipped[(job.loss, provider)] = reason
                        bar.update(len(job.modes))
                    if not runnable:
                        continue
                    sets = _input_sets(job, shape, dtype, ctx)
                    for provider in runnable:
                        run_provider(job, provider, sets, shape, dtype, ctx, report, bar)
                    del sets
                    _release(ctx.device)
    return report


# --- output -------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: Report, out=None) -> None:
    out = out or sys.stdout
    groups: Dict[tuple, list] = {}
    for row in report.rows:
        key = (row["loss"], row["mode"], row["dtype"], row["n"], row["v"], row["h_student"],
               row["h_teacher"])
        groups.setdefault(key, []).append(row)
    for (loss, mode, dtype, n, v, hs, ht), rows in groups.items():
        eager = next((r["median_ms"] for r in rows if r["provider"] == "eager"), None)
        print(f"\n{loss} {mode} {dtype} N={n} V={v}" + (f" Hs={hs} Ht={ht}" if hs else "")
              + (f" k={ht}" if loss == "sparse_distillation" else ""), file=out)
        print(f"  {'provider':<9}{'median ms':>11} {'p20-p80 ms':>21}{'peak MiB':>10}"
              f"{'GB/s':>8}{'TFLOP/s':>9}{'roofline%':>10}{'vs eager':>9}{'loss':>10}",
              file=out)
        for r in rows:
            speedup = None if eager is None else eager / r["median_ms"]
            value = report.values.get(_value_key(loss, dtype, n, v, hs, ht, r["provider"]))
            spread = f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
            print(f"  {r['provider']:<9}{r['median_ms']:>11.3f} {spread:>21}"
                  f"{r['peak_mem_mb']:>10.1f}"
                  f"{_fmt(r['gbps'], '8.2f')}{_fmt(r['tflops'], '9.4f')}"
                  f"{_fmt(r['roofline_pct'], '10.1f')}{_fmt(speedup, '8.2f')}x"
                  f"{_fmt(value, '10.5f')}", file=out)
    notes = {(loss, p): providers.PEER_NOTES[(loss, p)] for loss, p in
             {(r["loss"], r["provider"]) for r in report.rows} if (loss, p) in providers.PEER_NOTES}
    for (loss, provider), note in sorted(notes.items()):
        print(f"note {loss}/{provider}: {note}", file=out)
    for (loss, provider), reason in report.skipped.items():
        print(f"skipped {loss}/{provider}: {reason}", file=out)
    for failure in report.failed:
        print(f"FAILED {failure}", file=out)


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot_only:
        from .plot import render

        print("\n".join(render(args.out)))
        return 0
    device = _device(args.device)
    gpu = device.type == "cuda"
    slug = results_io.device_slug(device)
    ctx = Context(
        device=device,
        csv_path=os.path.join(args.out, f"{slug}.csv"),
        ceilings=models.Ceilings(os.path.join(args.out, f"{slug}-ceilings.json"), device,
                                 remeasure=args.remeasure_ceilings),
        reps=args.reps or (3 if args.quick else 50 if gpu else 10),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 5 if gpu else 2),
        seed=args.seed,
        provenance=dict(device=results_io.device_name(device), torch=torch.__version__,
                        triton=results_io.triton_version(), git_rev=results_io.git_rev()),
    )
    if ctx.reps < 1 or ctx.warmup < 0:
        raise SystemExit("--reps must be >= 1 and --warmup >= 0")
    if not gpu:
        print(f"load average before the run: {os.getloadavg()} on {os.cpu_count()} cores "
              "(other processes share this CPU: compare rows of one run)", file=sys.stderr)
    report = run_jobs(jobs_from_args(args, device), ctx)
    print(f"device {ctx.provenance['device']}; ceilings {ctx.ceilings.data}; "
          f"rows appended to {ctx.csv_path}")
    print_report(report)
    if not gpu:
        print(f"load average after the run: {os.getloadavg()}", file=sys.stderr)
    if args.plot:
        from .plot import render

        print("\n".join(render(args.out)))
    return 1 if report.failed else 0
