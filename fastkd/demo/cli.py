"""`fastkd demo` entry point: options, the per-seed loop over the methods, and the report.

See `fastkd.demo` for the experiment and what the printed numbers mean.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from .deploy import deployment_stats, format_deployment, quantize_int8
from .digits import (
    HEADLINE,
    DemoConfig,
    Split,
    accuracy,
    load_digits_tensors,
    make_split,
    run_student,
    run_student_kd,
    run_student_kd_unlabelled,
    run_teacher,
)
from .methods import METHODS, describe_methods, method_rows, parse_method_list

DESCRIPTION = ("Train a teacher and small students on scikit-learn's 8x8 digits, with and "
               "without knowledge distillation (fastkd.DistillationLoss), over several seeds; "
               "prints the test accuracies and an int8 deployment table.")

StudentMethod = Callable[[Split, DemoConfig, int, nn.Module], nn.Module]
STUDENT_METHODS: Dict[str, StudentMethod] = {
    "student": run_student,
    "student_kd": run_student_kd,
    "student_kd_unlabelled": run_student_kd_unlabelled,
}


def run_seed(x: torch.Tensor, y: torch.Tensor, config: DemoConfig, seed: int,
             methods: Dict[str, StudentMethod]) -> Tuple[Dict[str, float], Dict[str, dict]]:
    """One seed: ({row: test accuracy}, {model: deployment stats}).

    Rows: the teacher, every method's student (a method may return {row: model} to add
    auxiliary rows). When student_kd runs, its dynamically int8-quantised copy
    student_kd_int8 follows it, teacher_int8 follows the teacher (for scale), and the
    deployment stats (size, latency on the test split) of these four models are returned;
    otherwise the stats are empty.
    """
    split = make_split(x, y, config, seed)
    teacher = run_teacher(split, config, seed)
    teacher.requires_grad_(False)
    deployed: Dict[str, nn.Module] = {"teacher": teacher}
    if "student_kd" in methods:
        deployed["teacher_int8"] = quantize_int8(teacher)
    results = {row: accuracy(model, split.x_test, split.y_test)
               for row, model in deployed.items()}
    for name, method in methods.items():
        output = method(split, config, seed, teacher)
        models = output if isinstance(output, dict) else {name: output}
        if name == "student_kd":
            models = {name: output, "student_kd_int8": quantize_int8(output)}
            deployed.update(models)
        for row, model in models.items():
            results[row] = accuracy(model, split.x_test, split.y_test)
    if len(deployed) == 1:
        return results, {}
    return results, {row: deployment_stats(model, split.x_test, config.latency_repeats)
                     for row, model in deployed.items()}


def chosen_methods(config: DemoConfig) -> Tuple[Dict[str, StudentMethod], Tuple[str, ...]]:
    """(student methods to run by row, last-line rows) for the default demo or --method."""
    if not config.methods:
        return STUDENT_METHODS, HEADLINE
    methods: Dict[str, StudentMethod] = {"student": run_student, "student_kd": run_student_kd}
    for name in config.methods:
        methods.setdefault(METHODS[name].row, METHODS[name].runner)
    extra = tuple(row for row in method_rows(config.methods) if row not in HEADLINE)
    return methods, HEADLINE + extra


# ----------------------------------------------------------------------------- report


def summarise(values: Sequence[float]) -> Dict[str, float]:
    """mean, (sample) std, min, max of one method's per-seed accuracies."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std,
            "min": min(values), "max": max(values)}


def format_summary(per_seed: List[Dict[str, float]], baseline: str = "student",
                   headline: Sequence[str] = HEADLINE,
                   before_last: Sequence[str] = ()) -> List[str]:
    """Table of every model, paired gains of every student row over `baseline` (rows named
    teacher* are teachers), the int8-vs-float difference when present, then `before_last`,
    then the `headline` line last."""
    names = list(per_seed[0])
    stats = {name: summarise([r[name] for r in per_seed]) for name in names}
    width = max(len(name) for name in names)
    lines = [f"{'model':<{width}} {'mean':>7} {'std':>7} {'min':>7} {'max':>7}"]
    for name in names:
        s = stats[name]
        lines.append(f"{name:<{width}} {s['mean']:7.4f} {s['std']:7.4f} {s['min']:7.4f} "
                     f"{s['max']:7.4f}")
    for name in names:
        if name.startswith("teacher") or name == baseline:
            continue
        gains = [r[name] - r[baseline] for r in per_seed]
        wins = sum(gain > 0 for gain in gains)
        lines.append(f"{name} - {baseline}: mean {statistics.fmean(gains):+.4f}, "
                     f"better on {wins}/{len(gains)} seeds")
    if "student_kd_int8" in names:
        diffs = [r["student_kd_int8"] - r["student_kd"] for r in per_seed]
        lines.append(f"student_kd_int8 - student_kd: mean {statistics.fmean(diffs):+.4f}, "
                     f"min {min(diffs):+.4f}, max {max(diffs):+.4f}, "
                     f"equal on {sum(d == 0 for d in diffs)}/{len(diffs)} seeds")
    lines.extend(before_last)
    lines.append(" ".join(f"{name}_acc={stats[name]['mean']:.4f}" for name in headline))
    return lines


def parse_args(argv: Sequence[str]) -> DemoConfig:
    parser = argparse.ArgumentParser(prog="fastkd demo", description=DESCRIPTION)
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"number of seeds (default {DemoConfig.seeds}, 3 with --quick)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"passes over the training split (default {DemoConfig.epochs}, "
                             "3 with --quick)")
    parser.add_argument("--labels-per-class", type=int, default=DemoConfig.labelled_per_class,
                        help="labels the students may see per class; 0 = every label "
                             "(default %(default)s)")
    parser.add_argument("--method", default=None,
                        help="comma-separated distillation methods to compare, or 'all' "
                             "(response, dkd, hint, hidden, rkd, sp, mutual, ema, multi; see "
                             "fastkd.demo.methods); default: the Hinton demo alone")
    parser.add_argument("--quick", action="store_true",
                        help="3 seeds of 3 epochs, for tests (the numbers are then noisy)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(list(argv))
    seeds = args.seeds if args.seeds is not None else (3 if args.quick else DemoConfig.seeds)
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else DemoConfig.epochs)
    if seeds < 1:
        parser.error(f"--seeds must be >= 1, got {seeds}")
    if epochs < 1:
        parser.error(f"--epochs must be >= 1, got {epochs}")
    if args.labels_per_class < 0:
        parser.error(f"--labels-per-class must be >= 0, got {args.labels_per_class}")
    methods: Tuple[str, ...] = ()
    if args.method is not None:
        try:
            methods = parse_method_list(args.method)
        except ValueError as error:
            parser.error(str(error))
    return replace(DemoConfig(), seeds=seeds, epochs=epochs, progress=not args.no_progress,
                   labelled_per_class=args.labels_per_class or None, methods=methods)


def describe(config: DemoConfig) -> str:
    """One line naming the experiment's fixed choices."""
    labels = ("every training label" if config.labelled_per_class is None
              else f"{config.labelled_per_class} labels per class")
    return (f"teacher MLP {config.teacher_widths}, student MLP {config.student_widths} on "
            f"{labels}; fastkd.DistillationLoss(temperature={config.temperature}, "
            f"alpha={config.alpha}) (Hinton: moderate T for a small student, low weight on "
            f"the hard labels); {config.epochs} epochs, {config.seeds} seeds")


def main(argv: Sequence[str] = ()) -> int:
    config = parse_args(argv)
    torch.set_num_threads(1)  # the models are tiny; leave the other core to others
    x, y = load_digits_tensors()
    print(describe(config), flush=True)
    methods, headline = chosen_methods(config)
    if config.methods:
        print("methods (same student init, rows, batches and steps; weights fixed in "
              "advance):\n" + describe_methods(config.methods), flush=True)
    started = time.perf_counter()
    per_seed, deployment = [], []
    for seed in range(config.seeds):
        result, deployed = run_seed(x, y, config, seed, methods)
        per_seed.append(result)
        deployment.append(deployed)
        print(f"seed {seed}: " + " ".join(f"{k}={v:.4f}" for k, v in result.items()),
              flush=True)
    print(f"test accuracy over {config.seeds} seeds "
          f"({time.perf_counter() - started:.1f} s of training and timing):")
    table = format_deployment(deployment) if deployment[0] else []
    print("\n".join(format_summary(per_seed, headline=headline, before_last=table)),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
