"""The dense fused CPU loss in a training loop against the copy roofline of the same run.

``python -m fastkd.bench.cpu_roofline [--n 256,512,...] [--v 32000] [--reps 7] [--out DIR]``

For each N (V = 32000, float32, Hinton loss with a target, T = 2, alpha = 0.5, mean over
tokens, ``backend="cpu"``), two training-loop patterns are timed, forward + backward:

- ``fresh``: the student logits are a leaf; each step's gradient lands in ``.grad`` and is
  freed (``.grad = None``) before the next step, as an optimizer's ``zero_grad`` does;
- ``inplace``: ``inplace_backward=True``; before each step the logits are refilled from a
  source tensor (untimed: a model writes fresh logits every step), and the kernel writes the
  gradient over them.

The roofline is measured in the same run, interleaved with the steps so both see the same
machine load: the median time of ``dst.copy_(src)`` on one (N, V) float32 tensor, which moves
2 N V x 4 bytes. The loss must read student and teacher and write one gradient, 3 N V x 4
bytes, so its floor is 1.5 copies and ``roofline_pct = 100 * 1.5 * copy_ms / step_ms``.
Inputs (and the copy's sources) rotate among enough sets to exceed twice the last-level cache,
call by call, so no step or copy finds its inputs in cache. Per step, ``getrusage`` also gives
the user and system CPU time and the minor page faults (the cost of fresh memory, see
docs/cpu_kernel.md).

Writes ``<out>/<device-slug>.csv`` (appending) and, with matplotlib, ``<out>/<device-slug>.png``
(`make cpu-roofline` installs it).
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import time
from typing import Callable, List

import torch

from .results_io import device_name, device_slug, git_rev
from .timing import last_level_cache_bytes, quantile, rotation_count

DEFAULT_N = (256, 512, 1024, 2048, 4096, 8192)
COLUMNS = ("variant", "n", "v", "step_ms", "step_p20_ms", "step_p80_ms", "copy_ms",
           "floor_ms", "roofline_pct", "user_ms", "sys_ms", "minor_faults", "device",
           "torch", "git_rev", "timestamp")
OPTIONS = dict(temperature=2.0, alpha=0.5, backend="cpu")


class InputSet:
    """One (student, teacher, target) set plus the copy probe's destination."""

    def __init__(self, n: int, v: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.source = torch.randn(n, v, generator=g) * 3.0  # logits of realistic scale
        self.student = self.source.clone().requires_grad_(True)
        self.teacher = torch.randn(n, v, generator=g) * 3.0
        self.target = torch.randint(0, v, (n,), generator=g)
        self.copy_dst = torch.empty(n, v)


def _fresh_step(s: InputSet) -> Callable[[], None]:
    import fastkd

    s.student.grad = None  # the previous step's gradient is freed, as zero_grad does

    def step():
        fastkd.distillation_loss(s.student, s.teacher, s.target, **OPTIONS).backward()

    return step


def _inplace_step(s: InputSet) -> Callable[[], None]:
    import fastkd

    logits = s.source.clone().requires_grad_(True)  # this step's logits, written by "the model"

    def step():
        fastkd.distillation_loss(logits, s.teacher, s.target, inplace_backward=True,
                                 **OPTIONS).backward()

    return step


def _copy_step(s: InputSet) -> Callable[[], None]:
    return lambda: s.copy_dst.copy_(s.source)


def _timed(prepare: Callable[[InputSet], Callable[[], None]], s: InputSet):
    """(wall ms, user ms, sys ms, minor faults) of one prepared call."""
    call = prepare(s)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    call()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return (wall * 1e3, (after.ru_utime - before.ru_utime) * 1e3,
            (after.ru_stime - before.ru_stime) * 1e3, after.ru_minflt - before.ru_minflt)


def _figures(ms: float) -> float:
    """Four significant figures (the timings' noise is far larger)."""
    return float(f"{ms:.4g}")


def sweep_one(n: int, v: int, reps: int, warmup: int, seed: int) -> List[dict]:
    """Rows of both variants at one N, steps and copies interleaved rep by rep."""
    set_bytes = 3 * n * v * 4
    sets = [InputSet(n, v, seed + i)
            for i in range(rotation_count(set_bytes, last_level_cache_bytes()))]
    variants = {"fresh": _fresh_step, "inplace": _inplace_step}
    samples = {name: [] for name in (*variants, "copy")}
    calls = 0
    for rep in range(warmup + reps):
        for name, prepare in (*variants.items(), ("copy", _copy_step)):
            # Every call takes the next set, so none finds what the previous call read.
            result = _timed(prepare, sets[calls % len(sets)])
            calls += 1
            if rep >= warmup:
                samples[name].append(result)
    copy_ms = statistics.median(x[0] for x in samples["copy"])
    rows = []
    for name in variants:
        wall = [x[0] for x in samples[name]]
        step_ms = statistics.median(wall)
        rows.append(dict(
            variant=name, n=n, v=v, step_ms=_figures(step_ms),
            step_p20_ms=_figures(quantile(wall, 0.2)), step_p80_ms=_figures(quantile(wall, 0.8)),
            copy_ms=_figures(copy_ms), floor_ms=_figures(1.5 * copy_ms),
            roofline_pct=round(100 * 1.5 * copy_ms / step_ms, 1),
            user_ms=round(statistics.median(x[1] for x in samples[name]), 1),
            sys_ms=round(statistics.median(x[2] for x in samples[name]), 1),
            minor_faults=int(statistics.median(x[3] for x in samples[name]))))
    return rows


def plot(csv_path: str, png_path: str) -> None:
    """% of the roofline against N, one line per variant (the last row of each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        latest = {(r["variant"], int(r["n"])): r for r in csv.DictReader(f)}
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for variant in sorted({k[0] for k in latest}):
        points = sorted((n, float(r["roofline_pct"])) for (name, n), r in latest.items()
                        if name == variant)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label=f"{variant} gradient" if variant == "fresh" else "inplace_backward")
    ax.axhline(55, color="grey", linestyle="--", linewidth=1, label="55% goal")
    any_row = next(iter(latest.values()))
    ax.set(xscale="log", xlabel="N (tokens), V = 32000, fp32", ylabel="% of copy roofline",
           ylim=(0, 100), title=f"fastkd cpu kernel, training step\n{any_row['device']}, "
                                f"{any_row['git_rev']}")
    ax.set_xticks(sorted({k[1] for k in latest}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastkd.bench.cpu_roofline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default=",".join(map(str, DEFAULT_N)),
                        help="comma-separated token counts (default %(default)s)")
    parser.add_argument("--v", type=int, default=32000, help="vocabulary (default %(default)s)")
    parser.add_argument("--reps", type=int, default=7, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/cpu-roofline")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cpu")
    csv_path = os.path.join(args.out, device_slug(device) + ".csv")
    provenance = dict(device=device_name(device), torch=torch.__version__, git_rev=git_rev())
    new_file = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        for n in (int(x) for x in args.n.split(",")):
            for row in sweep_one(n, args.v, args.reps, args.warmup, args.seed):
                row.update(provenance, timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime()))
                writer.writerow(row)
                f.flush()
                print(f"N={n:5d} {row['variant']:8s} step {row['step_ms']:8.1f} ms  copy "
                      f"{row['copy_ms']:7.1f} ms  {row['roofline_pct']:5.1f}% of roofline  "
                      f"user {row['user_ms']:.0f} sys {row['sys_ms']:.0f} ms  faults "
                      f"{row['minor_faults']}", flush=True)
    try:
        plot(csv_path, os.path.join(args.out, device_slug(device) + ".png"))
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
