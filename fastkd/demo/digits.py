"""The digits experiment of `fastkd demo`: data, models, training and the Hinton loss.

Everything a run of one seed needs except the report: the stratified split of scikit-learn's
bundled 8x8 digits with hidden labels, the MLPs and their seed-derived initialisations, the
Adam loop, and the students (`run_student`, `run_student_kd`, `run_student_kd_unlabelled`).
`fastkd.demo.methods` builds its methods from these blocks; the experiment as a whole is
described in `fastkd.demo`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

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
