"""`fastkd demo --method NAME[,NAME...]`: the distillation families compared on the digits.

Every method trains the demo's student (MLP 64-16-10, the "student" initialisation of the
seed) for the same number of Adam steps, on the same 100 labelled training rows in the same
batch order as `student` and `student_kd` (same few-labels regime; the teacher is the seed's
frozen 64-256-256-10 MLP). Only the loss differs. Loss weights were fixed before any run, from
the papers or from the CRD benchmark (Tian et al. 2020, "Contrastive Representation
Distillation", whose RepDistiller scripts run each method with CE weight 1 and a per-method
weight beta, no KD term); none was tuned, per seed or otherwise.

"hidden" is the student's only hidden layer after its ReLU (16 units), matched to the
teacher's last hidden layer after its ReLU (256 units): `penultimate_and_logits`.

- response [response]: the `student_kd` row, Hinton: 0.1 CE + 0.9 T^2 KL, T=4
  (see fastkd.demo.digits).
- dkd [response]: CE + fastkd.decoupled_kd_loss(T=4, alpha=1, beta=8), Zhao et al. 2022's
  CIFAR-100 setting; their 20-epoch linear warm-up of the DKD term is not used.
- hint [feature]: CE + 100 * fastkd.HintLoss(16 -> 256, linear regressor), FitNets trained in
  one stage as in the CRD benchmark (beta=100); no response term, so the row shows what the
  hint alone adds. The regressor is trained by the same Adam as the student.
- hidden [feature]: CE + 1 * fastkd.HiddenStateLoss(16 -> 256, "cosine"), weight 1 as
  DistilBERT's alpha_cos=1.0 (its cosine term weighs the same order as its CE-type terms).
- rkd [relation]: CE + 1 * fastkd.RKDLoss(distance 25, angle 50) on the hidden embeddings,
  Park et al. 2019's weights, beta=1 as in the CRD benchmark.
- sp [relation]: CE + 3000 * fastkd.similarity_preserving_loss on the hidden features,
  gamma=3000 of Tung & Mori 2019 (also the CRD benchmark's).
- mutual [online]: no teacher; student A (the usual init) and a peer B (another init) trained
  together with fastkd.training.mutual_distillation_loss(T=1, alpha=2/3, "kl"), i.e. for A
  CE : KL = 1 : 1 as in deep mutual learning (Zhang et al. 2018). Reported: student A.
- ema [self]: no teacher; 0.5 CE + 0.5 T^2 KL(EMA copy || student), T=4, EMA decay 0.99
  (mean teacher's early-phase decay, Tarvainen & Valpola 2017; 0.999 would average most of a
  1200-step run). alpha is 0.5, not 0.1: the copy starts as the untrained student, so it
  earns no more trust than the labels.
- multi [response]: as `response` but fastkd.multi_teacher_distillation_loss(mode="sum",
  uniform weights, T=4, alpha=0.1) over three teachers: the seed's teacher, `teacher_b` (same
  architecture, another init) and `teacher_c` (MLP 64-512-10). Their accuracies are rows.

Measured (`fastkd demo --method all`, 5 seeds, 60 epochs, `cpu` backend; test accuracy mean
+- std, gain over the student alone 0.869 and seeds improved): student_kd 0.935 +- 0.015
(+0.067, 5/5), dkd 0.937 +- 0.008 (+0.069, 5/5), multi 0.934 +- 0.015 (+0.066, 5/5), rkd
0.927 +- 0.017 (+0.058, 5/5), hint 0.914 +- 0.021 (+0.045, 5/5), sp 0.907 +- 0.022 (+0.038,
5/5), hidden 0.895 +- 0.019 (+0.027, 5/5), mutual 0.872 +- 0.016 (+0.003, 3/5), ema 0.871 +-
0.020 (+0.002, 4/5). 309 s wall, 199 s CPU on the shared 2-core machine (load 2.4-6.3).
With 100 labelled inputs, the teacher's class probabilities carry the most; features and
relations help less; the teacher-free methods add no information and barely move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as torch_F

import fastkd

from ..training import EMATeacher, mutual_distillation_loss
from .digits import (
    UNLABELLED,
    DemoConfig,
    Split,
    build_mlp,
    cross_entropy_loss,
    labelled_rows,
    model_seed,
    run_student_kd,
    steps_for,
    train,
)

# A method's runner returns the trained student, or {row name: model} with the student under
# the method's own name and any auxiliary models (extra teachers) beside it.
RunnerResult = Union[nn.Module, Dict[str, nn.Module]]
Runner = Callable[[Split, DemoConfig, int, nn.Module], RunnerResult]


@dataclass(frozen=True)
class Method:
    """One `--method` choice: its family, the row it fills, a one-line summary of its loss
    and weights (printed with the results), and its runner."""

    family: str
    row: str
    summary: str
    runner: Runner


# ----------------------------------------------------------------------------- building blocks


def penultimate_and_logits(model: nn.Sequential,
                           x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, in) -> ((N, H) output of the last hidden layer after its ReLU, (N, out) logits).

    The demo's models are `build_mlp` Sequentials ending in a Linear, so the features are the
    input of that Linear: one forward pass gives both, with gradients when enabled.
    """
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise TypeError("model must be an nn.Sequential ending in an nn.Linear")
    hidden = model[:-1](x)
    return hidden, model[-1](hidden)


@torch.no_grad()
def frozen_outputs(teacher: nn.Module,
                   x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's (hidden, logits) on x, computed once in eval mode."""
    teacher.eval()
    return penultimate_and_logits(teacher, x)


class Trainee(nn.Module):
    """The modules one optimiser trains together: the student and its helpers (a regressor,
    a projection, a peer). Only a container, so `demo.train` sees every parameter."""

    def __init__(self, student: nn.Module, **helpers: nn.Module):
        super().__init__()
        self.student = student
        self.helpers = nn.ModuleDict(helpers)


def labelled_data(split: Split) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of the rows whose labels the students may see: every method trains on these."""
    rows = labelled_rows(split)
    return split.x_train[rows], split.y_students[rows]


def fresh_student(config: DemoConfig, seed: int) -> nn.Sequential:
    return build_mlp(config.student_widths, model_seed(seed, "student"))


def widths_of_hidden(config: DemoConfig) -> Tuple[int, int]:
    """(student hidden width, teacher hidden width): 16 and 256 in the demo."""
    return config.student_widths[-2], config.teacher_widths[-2]


# ----------------------------------------------------------------------------- runners


def feature_runner(name: str, weight: float,
                   make_criterion: Callable[[int, int], Optional[nn.Module]],
                   criterion_fn: Optional[Callable] = None) -> Runner:
    """Runner of CE + weight * criterion(student hidden, teacher hidden).

    make_criterion(student_width, teacher_width) builds a (possibly learnable) nn.Module, or
    returns None and `criterion_fn` (parameter-free) is used instead.
    """

    def run(split: Split, config: DemoConfig, seed: int, teacher: nn.Module) -> nn.Module:
        x, y = labelled_data(split)
        teacher_hidden, _ = frozen_outputs(teacher, x)
        student = fresh_student(config, seed)
        criterion = make_criterion(*widths_of_hidden(config))
        helpers = {} if criterion is None else {"criterion": criterion}
        measure = criterion if criterion is not None else criterion_fn
        trainee = Trainee(student, **helpers)

        def loss_fn(model: nn.Module, batch: Tuple[torch.Tensor, ...]) -> torch.Tensor:
            hidden, logits = penultimate_and_logits(model.student, batch[0])
            return torch_F.cross_entropy(logits, batch[1]) + weight * measure(hidden, batch[2])

        train(trainee, (x, y, teacher_hidden), loss_fn, config, steps_for(config, split),
              seed, f"seed {seed} {name}")
        return student

    return run


def run_dkd(split: Split, config: DemoConfig, seed: int, teacher: nn.Module) -> nn.Module:
    """CE + DKD(T=4, alpha=1, beta=8) against the frozen teacher's logits."""
    x, y = labelled_data(split)
    _, teacher_logits = frozen_outputs(teacher, x)

    def loss_fn(model: nn.Module, batch: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        logits = model(batch[0])
        dkd = fastkd.decoupled_kd_loss(logits, batch[2], batch[1], temperature=4.0,
                                       alpha=1.0, beta=8.0)
        return torch_F.cross_entropy(logits, batch[1]) + dkd

    return train(fresh_student(config, seed), (x, y, teacher_logits), loss_fn, config,
                 steps_for(config, split), seed, f"seed {seed} dkd")


MUTUAL_ALPHA = 2.0 / 3.0  # a's gradient: (alpha/2) CE_a + (1 - alpha) KL = (1/3)(CE_a + KL)


def run_mutual(split: Split, config: DemoConfig, seed: int, teacher: nn.Module) -> nn.Module:
    """Deep mutual learning of the student (A) and a peer (B, another init); returns A."""
    x, y = labelled_data(split)
    peer = build_mlp(config.student_widths, model_seed(seed, "peer"))
    trainee = Trainee(fresh_student(config, seed), peer=peer)

    def loss_fn(model: nn.Module, batch: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        return mutual_distillation_loss(model.student(batch[0]), model.helpers["peer"](batch[0]),
                                        batch[1], temperature=1.0, alpha=MUTUAL_ALPHA,
                                        divergence="kl")

    train(trainee, (x, y), loss_fn, config, steps_for(config, split), seed,
          f"seed {seed} mutual")
    return trainee.student


EMA_DECAY = 0.99


def run_ema(split: Split, config: DemoConfig, seed: int, teacher: nn.Module) -> nn.Module:
    """Self-distillation: 0.5 CE + 0.5 T^2 KL(EMA copy || student), T=4, decay 0.99."""
    x, y = labelled_data(split)
    student = fresh_student(config, seed)
    ema = EMATeacher(student, decay=EMA_DECAY)
    criterion = fastkd.DistillationLoss(temperature=4.0, alpha=0.5)

    def loss_fn(model: nn.Module, batch: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        return criterion(model(batch[0]), ema(batch[0]), batch[1])

    return train(student, (x, y), loss_fn, config, steps_for(config, split), seed,
                 f"seed {seed} ema", after_step=lambda: ema.update(student))


EXTRA_TEACHERS = {"teacher_b": None, "teacher_c": (64, 512, 10)}  # None: the usual widths


def train_extra_teacher(split: Split, config: DemoConfig, seed: int, role: str) -> nn.Module:
    """Another teacher for `multi`: CE on every training label, the usual step count."""
    widths = EXTRA_TEACHERS[role] or config.teacher_widths
    model = build_mlp(widths, model_seed(seed, role))
    train(model, (split.x_train, split.y_train), cross_entropy_loss, config,
          steps_for(config, split), seed, f"seed {seed} {role}")
    return model.eval().requires_grad_(False)


def run_multi(split: Split, config: DemoConfig, seed: int,
              teacher: nn.Module) -> Dict[str, nn.Module]:
    """Hinton's loss (T=4, alpha=0.1) summed over three teachers with weights 1/3 each."""
    x, y = labelled_data(split)
    extra = {role: train_extra_teacher(split, config, seed, role) for role in EXTRA_TEACHERS}
    teachers = [teacher, *extra.values()]
    logits = [frozen_outputs(t, x)[1] for t in teachers]

    def loss_fn(model: nn.Module, batch: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        return fastkd.multi_teacher_distillation_loss(
            model(batch[0]), list(batch[2:]), batch[1], mode="sum", temperature=config.temperature,
            alpha=config.alpha, ignore_index=UNLABELLED)

    student = train(fresh_student(config, seed), (x, y, *logits), loss_fn, config,
                    steps_for(config, split), seed, f"seed {seed} multi")
    return {"multi": student, **extra}


def _cosine_hidden(student_width: int, teacher_width: int) -> nn.Module:
    return fastkd.HiddenStateLoss(student_width, teacher_width, metric="cosine")


def _linear_hint(student_width: int, teacher_width: int) -> nn.Module:
    return fastkd.HintLoss(student_width, teacher_width, kind="linear")


METHODS: Dict[str, Method] = {
    "response": Method("response", "student_kd",
                       "0.1 CE + 0.9 T^2 KL(teacher || student), T=4 (Hinton et al. 2015)",
                       run_student_kd),
    "dkd": Method("response", "dkd", "CE + DKD(T=4, alpha=1, beta=8) (Zhao et al. 2022 "
                  "CIFAR; no warm-up)", run_dkd),
    "hint": Method("feature", "hint", "CE + 100 * FitNets hint, linear regressor 16->256 "
                   "(one stage, CRD-benchmark beta)",
                   feature_runner("hint", 100.0, _linear_hint)),
    "hidden": Method("feature", "hidden", "CE + 1 * (1 - cos) hidden states, projection "
                     "16->256 (DistilBERT alpha_cos=1)",
                     feature_runner("hidden", 1.0, _cosine_hidden)),
    "rkd": Method("relation", "rkd", "CE + 1 * RKD(distance 25, angle 50) on hidden "
                  "embeddings (Park et al. 2019; CRD beta=1)",
                  feature_runner("rkd", 1.0, lambda s, t: fastkd.RKDLoss())),
    "sp": Method("relation", "sp", "CE + 3000 * similarity-preserving on hidden features "
                 "(Tung & Mori 2019 gamma)",
                 feature_runner("sp", 3000.0, lambda s, t: None,
                                fastkd.similarity_preserving_loss)),
    "mutual": Method("online", "mutual", "no teacher: student + peer, CE : KL = 1 : 1 "
                     "(T=1, DML; alpha=2/3), student reported", run_mutual),
    "ema": Method("self", "ema", "no teacher: 0.5 CE + 0.5 T^2 KL(EMA copy || student), T=4, "
                  "decay 0.99 (mean teacher)", run_ema),
    "multi": Method("response", "multi", "0.1 CE + 0.9 T^2 mean_i KL(teacher_i || student), "
                    "T=4, teachers: teacher, teacher_b (other init), teacher_c (64-512-10)",
                    run_multi),
}


def parse_method_list(text: str) -> Tuple[str, ...]:
    """"dkd,hint" -> ("dkd", "hint"); "all" -> every method. Raises ValueError naming an
    unknown method. Order kept, duplicates dropped."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--method needs at least one name")
    if "all" in names:
        return tuple(METHODS)
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown --method {', '.join(unknown)}; choose from "
                         f"{', '.join(METHODS)} or all")
    return tuple(dict.fromkeys(names))


def method_rows(names: Sequence[str]) -> Tuple[str, ...]:
    """The table rows (and extra last-line fields) the chosen methods fill, in order."""
    return tuple(METHODS[name].row for name in names)


def describe_methods(names: Sequence[str]) -> str:
    """One line per chosen method: name [family] (row): loss and weights."""
    return "\n".join(f"  {name} [{METHODS[name].family}] -> row {METHODS[name].row}: "
                     f"{METHODS[name].summary}" for name in names)
