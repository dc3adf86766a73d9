"""Time fastkd's distillation losses against eager PyTorch, torch.compile and peer libraries.

Each measurement is one training-step call of a loss on fresh random inputs (normal logits of
realistic scale): `fwd` times the forward (inputs require grad, so a fused kernel that computes
the gradient in its forward pays for it here), `bwd` times loss.backward() after an untimed
forward, `fwd+bwd` times both. Every row records the median time and its 20%/80% quantiles,
the peak memory the step allocates beyond its inputs, the achieved GB/s (or TFLOP/s for the
fused lm-head loss) and the percent of this device's measured copy bandwidth (or matmul rate).

Rows are appended to OUT/<device>.csv as each one is measured (OUT is ./fastkd-bench unless
--out says otherwise); a re-run adds rows, and summaries use the newest row per measurement.
The device's measured ceilings are cached in OUT/<device>-ceilings.json. --plot renders PNGs
and OUT/SUMMARY.md (needs matplotlib).

examples:
  fastkd bench --quick                          a tiny run on this machine (seconds)
  fastkd bench --loss dense --n 2048 --v 32000  the dense loss at one shape
  fastkd bench --loss fused-linear --n 1024,4096 --hs 2048 --ht 4096 --v 128256 --dtype bf16
  fastkd bench --preset gpu-goals --plot        the GPU goal measurements, with plots
  fastkd bench --plot-only --out DIR            re-render DIR/SUMMARY.md and plots
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

import torch

from . import models, providers, results_io, timing
from .presets import PRESETS, Job, preset_jobs
from .providers import LossOptions, Shape
from .report import Report, print_report

__all__ = ["Job", "PRESETS", "build_parser", "jobs_from_args", "main", "preset_jobs"]

DEFAULT_OUT = "fastkd-bench"   # relative: created in the current directory
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LOSS_ALIASES = {
    "dense": "distillation", "distillation": "distillation",
    "fused-linear": "fused_linear_distillation", "fused_linear": "fused_linear_distillation",
    "fused_linear_distillation": "fused_linear_distillation",
    "sparse": "sparse_distillation", "topk": "sparse_distillation",
    "top-k": "sparse_distillation", "sparse_distillation": "sparse_distillation",
}


# --- argument parsing ---------------------------------------------------------------------

def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, "
                                         f"got {text!r}")
    return values


def _choice_list(text: str, choices: Sequence[str], name: str) -> tuple:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    if values == ("all",):
        return tuple(choices)
    bad = [x for x in values if x not in choices]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{name} takes names from {', '.join(choices)} "
                                         f"(comma-separated) or all; got {text!r}")
    return values


def parse_losses(text: str) -> tuple:
    """"dense,fused-linear" -> ("distillation", "fused_linear_distillation"); "all" -> every
    loss. Short names (dense, sparse, fused-linear) and the long ones are accepted."""
    names = [x.strip().lower() for x in text.split(",") if x.strip()]
    if names == ["all"]:
        return providers.LOSSES
    bad = [x for x in names if x not in LOSS_ALIASES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"--loss takes dense, sparse, fused-linear (or distillation, sparse_distillation, "
            f"fused_linear_distillation), comma-separated, or all; got {text!r}")
    return tuple(dict.fromkeys(LOSS_ALIASES[x] for x in names))


def build_parser() -> argparse.ArgumentParser:
    """The `fastkd bench` argument parser."""
    p = argparse.ArgumentParser(prog="fastkd bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS,
                   help="run a predefined set of measurements: cpu-goals (float32, V=32000) "
                        "or gpu-goals (bf16, V=128256, one CUDA GPU); shape options are "
                        "ignored, --loss and --providers filter it")
    p.add_argument("--loss", type=parse_losses, metavar="LOSS[,LOSS...]",
                   help="which loss: dense (distillation_loss), sparse (top-k teacher, "
                        "sparse_distillation_loss), fused-linear (lm-head fused in, "
                        "fused_linear_distillation_loss), comma-separated, or all "
                        "(default dense)")
    p.add_argument("--providers", metavar="NAME[,NAME...]",
                   type=lambda s: _choice_list(s, providers.PROVIDERS, "--providers"),
                   help="who computes the loss, comma-separated: fastkd backends torch, cpu, "
                        "triton, cuda; peers eager (plain PyTorch), compile (torch.compile), "
                        "liger (Liger-Kernel), cce (Cut Cross-Entropy); default: all that "
                        f"fit the device (on a CPU: {','.join(providers.CPU_PROVIDERS)}). "
                        "One that cannot run here is reported and writes no row")
    p.add_argument("--n", type=_int_list, metavar="N[,N...]",
                   help="tokens per batch (default 2048 on a CPU, 8192 on a GPU)")
    p.add_argument("--v", type=_int_list, metavar="V[,V...]",
                   help="vocabulary size (default 32000 on a CPU, 128256 on a GPU)")
    p.add_argument("--hs", type=_int_list, metavar="H[,H...]",
                   help="student hidden size of the fused-linear loss (default 256 / 2048)")
    p.add_argument("--ht", type=_int_list, metavar="H[,H...]",
                   help="teacher hidden size of the fused-linear loss (default 256 / 4096)")
    p.add_argument("--k", type=_int_list, metavar="K[,K...]",
                   help="teacher entries per token of the sparse loss (default 64)")
    p.add_argument("--dtype", type=lambda s: _choice_list(s, list(DTYPES), "--dtype"),
                   metavar="DTYPE[,DTYPE...]",
                   help="fp32, bf16 or fp16, comma-separated (default fp32 on a CPU, bf16 on "
                        "a GPU)")
    p.add_argument("--mode", default=("fwd+bwd",), metavar="MODE[,MODE...]",
                   type=lambda s: _choice_list(s, models.MODES, "--mode"),
                   help="what is timed: fwd, bwd, fwd+bwd, comma-separated, or all "
                        "(default fwd+bwd)")
    p.add_argument("--temperature", type=float, default=2.0,
                   help="distillation temperature T (default %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the hard-label cross-entropy (default %(default)s)")
    p.add_argument("--reps", type=int,
                   help="timed repetitions per row (default 10 on a CPU, 50 on a GPU, 3 with "
                        "--quick)")
    p.add_argument("--warmup", type=int,
                   help="untimed repetitions before them (default 2 on a CPU, 5 on a GPU)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (N=256, V=4096, H=64, k=16) and 3 repetitions: checks "
                        "that everything runs, measures nothing useful")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (default: the GPU when there is one)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="results folder, created if needed (default ./%(default)s)")
    p.add_argument("--plot", action="store_true",
                   help="after the run, render PNGs and SUMMARY.md in the results folder")
    p.add_argument("--plot-only", action="store_true",
                   help="measure nothing; only render PNGs and SUMMARY.md from the results")
    p.add_argument("--remeasure-ceilings", action="store_true",
                   help="measure the device's copy bandwidth and matmul rate again instead "
                        "of reading them from the cache in the results folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
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
    """The jobs the parsed options ask for on `device`."""
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


def utc_timestamp() -> str:
    """Now, in UTC, ISO 8601 to the second: '2026-12-01T20:41:07Z'."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _input_sets(job: Job, shape: Shape, dtype, ctx: Context) -> list:
    first = providers.make_inputs(job.loss, shape, dtype, ctx.device, job.options, ctx.seed)
    count = 1
    if ctx.device.type == "cpu":  # GPU runs flush L2 instead (timing.time_cuda)
        count = timing.rotation_count(providers.inputs_nbytes(first),
                                      timing.last_level_cache_bytes())
    return [first] + [providers.make_inputs(job.loss, shape, dtype, ctx.device, job.options,
                                            ctx.seed + i) for i in range(1, count)]


def hidden_columns(loss: str, shape: Shape) -> tuple:
    """(h_student, h_teacher) columns: hidden sizes, or (0, k) for the sparse loss."""
    return (0, shape.k) if loss == "sparse_distillation" else (shape.hs, shape.ht)


def measure(job: Job, provider: str, mode: str, fn, sets: list, shape: Shape, dtype,
            ctx: Context) -> Dict[str, object]:
    """Times one (provider, mode), appends its CSV row and returns it."""
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
               roofline_pct=pct, timestamp=utc_timestamp(), **ctx.provenance)
    results_io.append_rows(ctx.csv_path, [row])
    return row


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_provider(job, provider, sets, shape, dtype, ctx, report, bar) -> None:
    key = report.value_key(job.loss, DTYPE_NAMES[dtype], shape.n, shape.v,
                           *hidden_columns(job.loss, shape), provider)
    try:
        fn = providers.build_provider(job.loss, provider, job.options)
        # One forward (graph kept, as in training) for the printed loss value: a sanity
        # check that providers compute the same function (peers' equivalents differ).
        report.values[key] = float(fn(sets[0]).detach().float())
    except Exception as exc:
        from fastkd import BackendUnavailableError

        if isinstance(exc, BackendUnavailableError):   # e.g. no kernel for this loss here
            report.skipped[(job.loss, provider)] = str(exc)
            bar.update(len(job.modes))
            return
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


def run_jobs(jobs: List[Job], ctx: Context, progress: bool = True) -> Report:
    """Runs every job, skipping (and recording why) providers that cannot run here."""
    from tqdm import tqdm

    report = Report()
    total = sum(len(j.providers) * len(j.modes) * len(j.dtypes) * len(j.shapes) for j in jobs)
    with tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True,
              disable=not progress) as bar:
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


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("fastkd bench: --device cuda, but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _render(out_dir: str) -> None:
    from .plot import render

    print("\n".join(render(out_dir)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `fastkd bench` with the arguments `argv` (see `fastkd bench --help`).

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after `fastkd bench` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when every requested measurement that can run here ran; 1 when one failed or
        when nothing could run at all (every provider was skipped).
    """
    args = build_parser().parse_args(argv)
    out = os.path.abspath(args.out)
    if args.plot_only:
        if not os.path.isdir(out):
            raise SystemExit(f"fastkd bench --plot-only: no results folder {out}")
        _render(out)
        return 0
    device = _device(args.device)
    gpu = device.type == "cuda"
    slug = results_io.device_slug(device)
    ctx = Context(
        device=device,
        csv_path=os.path.join(out, f"{slug}.csv"),
        ceilings=models.Ceilings(os.path.join(out, f"{slug}-ceilings.json"), device,
                                 remeasure=args.remeasure_ceilings),
        reps=args.reps or (3 if args.quick else 50 if gpu else 10),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 5 if gpu else 2),
        seed=args.seed,
        provenance=dict(device=results_io.device_name(device), torch=torch.__version__,
                        triton=results_io.triton_version(), git_rev=results_io.git_rev()),
    )
    if ctx.reps < 1 or ctx.warmup < 0:
        raise SystemExit("fastkd bench: --reps must be >= 1 and --warmup >= 0")
    if not gpu:
        print(f"load average before the run: {os.getloadavg()} on {os.cpu_count()} cores "
              "(other processes share this CPU: compare rows of one run)", file=sys.stderr)
    report = run_jobs(jobs_from_args(args, device), ctx)
    print(f"device: {ctx.provenance['device']}; ceilings: {ctx.ceilings.data or 'none'}")
    print_report(report)
    if report.rows:
        print(f"{len(report.rows)} row(s) appended to {ctx.csv_path}")
    else:
        print("nothing was measured: no row written")
    if not gpu:
        print(f"load average after the run: {os.getloadavg()}", file=sys.stderr)
    if args.plot and report.rows:
        _render(out)
    return 1 if report.failed or not report.rows else 0
