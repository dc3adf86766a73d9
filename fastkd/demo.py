"""`python -m fastkd demo`: Hinton-style distillation on scikit-learn's 8x8 digits.

Per seed, on the bundled digits (1797 images, no download), a stratified 70/30 train/test
split drawn from the seed, and one initialisation per role drawn from the seed:

- teacher: MLP 64-256-256-10, cross-entropy on every training label (1257 examples);
- student: MLP 64-16-10 alone, cross-entropy on the labels it may see;
- student_kd: the same student architecture, same initialisation, same inputs and same number
  of optimizer steps, trained on `fastkd.DistillationLoss(temperature=4, alpha=0.1)` against
  the frozen teacher's logits.
- student_kd_unlabelled (extra row, not on the last line): as student_kd, plus the teacher's
  soft targets on the training inputs whose labels the students may not see.

Data regime: the students see only 10 labelled examples per class (100 of the 1257, ~8%),
after Hinton et al. (2015, §6: soft targets let a model trained on 3% of the data generalise
far better than hard targets on the same 3%). With every label visible, distillation does not
help this student (5 seeds, 60 epochs: student 0.9763 +- 0.0056, student_kd 0.9744 +- 0.0072;
a 64-8-10 student: 0.9488 vs 0.9547, within one std), so the demo uses the regime in which
soft targets carry information the labels do not; `--labels-per-class 0` reruns the
all-labels regime. The baseline is not starved by over-fitting: its test accuracy is 0.839 at
5 epochs, 0.869 at 60 and 0.873 at 120.

T and alpha were fixed before any run, from Hinton et al.: a student much smaller than its
teacher does best at a moderate temperature (they report 2.5-4 for 30-unit layers), and "a
considerably lower weight on the [hard-label] objective" works best, hence T=4, alpha=0.1.
A later sensitivity check (same 5 seeds; reported, not used to choose) gave student_kd
0.874 / 0.915 / 0.936 / 0.934 at T = 1 / 2 / 4 / 8 (alpha=0.1) and 0.933 at T=4, alpha=0.5,
against 0.869 for the student alone: any T >= 2 helps by 5-7 points; T=1 barely does, since
the teacher's T=1 distribution is almost one-hot.
These numbers came from the `torch` backend; the fused `cpu` backend rounds differently in
float32, so over 1200 steps its accuracies can differ in the third decimal.

After distillation, student_kd is also dynamically int8-quantised (`fastkd.demo_deploy`):
its test accuracy is the row student_kd_int8, and a deployment table gives the serialised
size and the single-thread latency on the whole test split (539 rows) of the teacher, the
float32 student_kd and their int8 copies (teacher_int8 is there for scale). Measured (5 seeds):
int8 leaves the accuracy unchanged (0.9354 both; per seed within +-0.0019), shrinks the
checkpoint 7069 -> 4877 bytes, but is slower at this size (~65 -> ~127 us best call): with 16
hidden units, quantising the activations costs more than the int8 matmul saves; the teacher
gets 342677 -> 91199 bytes and ~1160 -> ~870 us.

`--method NAME[,NAME...]` (or `all`) compares other distillation families (DKD, FitNets hint,
hidden-state cosine, RKD, similarity-preserving, mutual, EMA self-distillation, multi-teacher)
on the same regime; see `fastkd.demo_methods`. The rows are then teacher, student, student_kd
(= `response`) and one per method; student_kd_unlabelled is left out.

Every number printed is a test accuracy in [0, 1], summarised over all seeds (mean, sample
std, min, max), never a picked seed. The last stdout line is
`teacher_acc=<x> student_acc=<y> student_kd_acc=<z>` (means over seeds), followed with
--method by one `<row>_acc=<mean>` field per method other than response.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as torch_F

import fastkd

UNLABELLED = -1  # label of a transfer-set example whose label the student may not see
HEADLINE = ("teacher", "student", "student_kd")  # the keys of the last stdout line


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the experiment; fixed before any run, identical for every seed."""

    seeds: int = 5
    epochs: int = 60                  # passes over the training split (same steps per model)
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    test_fraction: float = 0.3
    labelled_per_class: Optional[int] = 10   # labels the students see; None = all
    teacher_widths: Tuple[int, ...] = (64, 256, 256, 10)
    student_widths: Tuple[int, ...] = (64, 16, 10)
    temperature: float = 4.0
    alpha: float = 0.1
    progress: bool = True
    methods: Tuple[str, ...] = ()     # `--method` names; () = the default demo
    latency_repeats: int = 50         # timed calls per model and seed (median reported)


@dataclass
class Split:
    """One seed's data. x_*: (N, 64) float32 standardised; y_*: (N,) int64 in [0, 10).

    y_students: the training labels the students may use (UNLABELLED where hidden).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    y_students: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


# ----------------------------------------------------------------------------- data


def load_digits_tensors() -> Tuple[torch.Tensor, torch.Tensor]:
    """(1797, 64) float32 pixels in [0, 16] and (1797,) int64 labels, bundled with sklearn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (torch.as_tensor(digits.data, dtype=torch.float32),
            torch.as_tensor(digits.target, dtype=torch.int64))


def stratified_split(y: torch.Tensor, fraction: float,
                     generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (rest, picked): `fraction` of every class picked at random."""
    rest, picked = [], []
    for label in torch.unique(y):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = int(round(fraction * len(members)))
        picked.append(members[:cut])
        rest.append(members[cut:])
    return torch.cat(rest), torch.cat(picked)


def hide_labels(y: torch.Tensor, per_class: Optional[int],
                generator: torch.Generator) -> torch.Tensor:
    """Copy of y keeping `per_class` random labels of every class, UNLABELLED elsewhere."""
    if per_class is None:
        return y.clone()
    visible = torch.full_like(y, UNLABELLED)
    for label in torch.unique(y):
        members = torch.nonzero(y == label).flatten()
        keep = members[torch.randperm(len(members), generator=generator)[:per_class]]
        visible[keep] = y[keep]
    return visible


def make_split(x: torch.Tensor, y: torch.Tensor, config: DemoConfig, seed: int) -> Split:
    """Seed-determined train/test split, label hiding, and standardisation fitted on train."""
    generator = torch.Generator().manual_seed(seed)
    train, test = stratified_split(y, config.test_fraction, generator)
    mean = x[train].mean(0)
    std = x[train].std(0).clamp_min(1.0)  # constant border pixels: avoid dividing by ~0
    x_std = (x - mean) / std
    y_students = hide_labels(y[train], config.labelled_per_class, generator)
    return Split(x_std[train], y[train], y_students, x_std[test], y[test])


# ----------------------------------------------------------------------------- models


def model_seed(seed: int, role: str) -> int:
    """Initialisation seed of one role ("teacher", "student", or the `--method` extras "peer",
    "teacher_b", "teacher_c") for one experiment seed.

    Every student method shares the "student" seed, so they start from the same weights.
    """
    roles = {"teacher": 1, "student": 2, "peer": 3, "teacher_b": 4, "teacher_c": 5}
    return 1000 * seed + roles[role]


def build_mlp(widths: Sequence[int], seed: int) -> nn.Sequential:
    """ReLU MLP widths[0] -> ... -> widths[-1], initialised from `seed` alone."""
    torch.manual_seed(seed)
    layers: List[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, 64) -> (N, 10) logits in eval mode."""
    model.eval()
    return model(x)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of x whose arg-max logit equals y, in [0, 1]."""
    return float((predict_logits(model, x).argmax(-1) == y).float().mean())


# ----------------------------------------------------------------------------- training

# loss_fn(model, batch) -> scalar: batch is a tuple of row-aligned tensors, x first.
LossFn = Callable[[nn.Module, Tuple[torch.Tensor, ...]], torch.Tensor]


def batches(n_rows: int, batch_size: int, steps: int,
            generator: torch.Generator):
    """`steps` index batches, reshuffling each time the rows run out."""
    order, position = torch.randperm(n_rows, generator=generator), 0
    for _ in range(steps):
        if position >= n_rows:
            order, position = torch.randperm(n_rows, generator=generator), 0
        yield order[position:position + batch_size]
        position += batch_size


def train(model: nn.Module, data: Tuple[torch.Tensor, ...], loss_fn: LossFn,
          config: DemoConfig, steps: int, seed: int, desc: str,
          after_step: Optional[Callable[[], None]] = None) -> nn.Module:
    """Adam on `loss_fn` for `steps` mini-batches of the rows of `data`; returns the model.

    The batch order depends on `seed` and len(data[0]) only, so every method trained on the
    same rows sees the same batches. `after_step()` runs after each optimizer step (EMA).
    """
    from tqdm import tqdm

    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    index_batches = batches(len(data[0]), config.batch_size, steps, generator)
    for index in tqdm(index_batches, total=steps, desc=desc, file=sys.stderr,
                      leave=False, disable=not config.progress, mininterval=0.5):
        loss = loss_fn(model, tuple(t[index] for t in data))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
    return model


def cross_entropy_loss(model: nn.Module, batch: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """batch = (x, y): plain cross-entropy, the baseline objective."""
    x, y = batch[0], batch[1]
    return torch_F.cross_entropy(model(x), y)


def hinton_loss(config: DemoConfig) -> LossFn:
    """batch = (x, y, teacher_logits), y = UNLABELLED on transfer-only rows.

    Labelled rows: alpha * CE + (1 - alpha) * T^2 * KL(p_t || p_s) (one fastkd call with the
    unlabelled rows masked by ignore_index). Unlabelled rows: the soft term alone,
    (1 - alpha) * T^2 * KL, so a row weighs the same whether or not its label is visible.
    """
    with_labels = fastkd.DistillationLoss(temperature=config.temperature, alpha=config.alpha,
                                          ignore_index=UNLABELLED, reduction="sum")
    soft_only = fastkd.DistillationLoss(temperature=config.temperature, reduction="none")

    def loss_fn(model: nn.Module, batch: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, teacher_logits = batch[0], batch[1], batch[2]
        student_logits = model(x)
        unlabelled = (y == UNLABELLED).to(student_logits.dtype)
        soft_rows = soft_only(student_logits, teacher_logits) * unlabelled
        total = with_labels(student_logits, teacher_logits, y)
        total = total + (1.0 - config.alpha) * soft_rows.sum()
        return total / len(x)

    return loss_fn


# ----------------------------------------------------------------------------- methods


def steps_for(config: DemoConfig, split: Split) -> int:
    """Optimizer steps of every model: `epochs` passes over the full training split."""
    return config.epochs * math.ceil(len(split.x_train) / config.batch_size)


def labelled_rows(split: Split) -> torch.Tensor:
    return torch.nonzero(split.y_students != UNLABELLED).flatten()


def run_teacher(split: Split, config: DemoConfig, seed: int) -> nn.Module:
    """The big model, trained with cross-entropy on every training label."""
    model = build_mlp(config.teacher_widths, model_seed(seed, "teacher"))
    return train(model, (split.x_train, split.y_train), cross_entropy_loss, config,
                 steps_for(config, split), seed, f"seed {seed} teacher")


def run_student(split: Split, config: DemoConfig, seed: int,
                teacher: nn.Module) -> nn.Module:
    """The small model alone: cross-entropy on the labels it may see (teacher unused)."""
    rows = labelled_rows(split)
    model = build_mlp(config.student_widths, model_seed(seed, "student"))
    return train(model, (split.x_train[rows], split.y_students[rows]), cross_entropy_loss,
                 config, steps_for(config, split), seed, f"seed {seed} student")


def distil(split: Split, config: DemoConfig, seed: int, teacher: nn.Module,
           rows: torch.Tensor, name: str) -> nn.Module:
    """A student with `run_student`'s init and step count, on the Hinton loss over `rows`."""
    x = split.x_train[rows]
    teacher_logits = predict_logits(teacher, x)  # frozen teacher: computed once
    model = build_mlp(config.student_widths, model_seed(seed, "student"))
    return train(model, (x, split.y_students[rows], teacher_logits), hinton_loss(config),
                 config, steps_for(config, split), seed, f"seed {seed} {name}")


def run_student_kd(split: Split, config: DemoConfig, seed: int,
                   teacher: nn.Module) -> nn.Module:
    """Distilled on exactly the student's inputs: only the targets differ from `student`."""
    return distil(split, config, seed, teacher, labelled_rows(split), "student_kd")


def run_student_kd_unlabelled(split: Split, config: DemoConfig, seed: int,
                              teacher: nn.Module) -> nn.Module:
    """Distilled on every training input: soft targets alone where labels are hidden."""
    every_row = torch.arange(len(split.x_train))
    return distil(split, config, seed, teacher, every_row, "student_kd_unlabelled")


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
    from fastkd.demo_deploy import deployment_stats, quantize_int8

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
    from fastkd.demo_methods import METHODS, method_rows

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
    parser = argparse.ArgumentParser(prog="fastkd demo", description=__doc__.split("\n")[0])
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
                             "fastkd.demo_methods); default: the Hinton demo alone")
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
        from fastkd.demo_methods import parse_method_list

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
    from fastkd.demo_deploy import format_deployment

    x, y = load_digits_tensors()
    print(describe(config), flush=True)
    methods, headline = chosen_methods(config)
    if config.methods:
        from fastkd.demo_methods import describe_methods

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
