"""`nn.Module` wrappers of the functional losses: keywords fixed at construction."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F
from ._dispatch import check_backend_name
from ._validation import check_options


def _loss_keywords(temperature, alpha, divergence, beta, ignore_index, label_smoothing, softcap,
                   reduction, backend) -> dict:
    """Validated keywords shared by every loss module (backend checked, not stored)."""
    check_backend_name(backend)
    options = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                   ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                   reduction=reduction)
    check_options(**options, num_items_in_batch=None)
    return options


class DistillationLoss(nn.Module):
    """`fastkd.distillation_loss` as a module: `crit(student_logits, teacher_logits, target)`.

    Takes every keyword of `distillation_loss` except `num_items_in_batch`, which varies per
    step and is passed to `forward`.
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, divergence: str = "kl",
                 beta: float = 0.5, scale_by_t2: bool = True, ignore_index: int = -100,
                 label_smoothing: float = 0.0, softcap: Optional[float] = None,
                 reduction: str = "mean", backend: str = "auto",
                 inplace_backward: bool = False):
        super().__init__()
        self.options = _loss_keywords(temperature, alpha, divergence, beta, ignore_index,
                                      label_smoothing, softcap, reduction, backend)
        self.options.update(scale_by_t2=scale_by_t2, backend=backend,
                            inplace_backward=inplace_backward)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None, num_items_in_batch=None) -> torch.Tensor:
        return F.distillation_loss(student_logits, teacher_logits, target,
                                   num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearDistillationLoss(nn.Module):
    """`fastkd.fused_linear_distillation_loss` as a module.

    `crit(student_hidden, student_weight, teacher_hidden, teacher_weight, target)`, e.g. with
    the models' final hidden states and `lm_head.weight`; biases and `num_items_in_batch` are
    per-call arguments of `forward`. The teacher receives no gradient.
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, divergence: str = "kl",
                 beta: float = 0.5, scale_by_t2: bool = True, ignore_index: int = -100,
                 label_smoothing: float = 0.0, softcap: Optional[float] = None,
                 reduction: str = "mean", chunk_size: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        self.options = _loss_keywords(temperature, alpha, divergence, beta, ignore_index,
                                      label_smoothing, softcap, reduction, backend)
        self.options.update(scale_by_t2=scale_by_t2, chunk_size=chunk_size, backend=backend)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                target: Optional[torch.Tensor] = None, student_bias=None, teacher_bias=None,
                num_items_in_batch=None) -> torch.Tensor:
        return F.fused_linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias,
            num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class SparseDistillationLoss(nn.Module):
    """`fastkd.sparse_distillation_loss` as a module (top-k / offline teacher):
    `crit(student_logits, teacher_topk_logprobs, teacher_topk_indices, target)`."""

    def __init__(self, tail: str = "bucket", temperature: float = 1.0, alpha: float = 0.5,
                 divergence: str = "kl", beta: float = 0.5, scale_by_t2: bool = True,
                 ignore_index: int = -100, label_smoothing: float = 0.0,
                 softcap: Optional[float] = None, reduction: str = "mean",
                 backend: str = "auto", teacher_temperature: Optional[float] = None):
        super().__init__()
        F._check_tail(tail)
        F._teacher_scale(teacher_temperature, temperature, tail)
        self.options = _loss_keywords(temperature, alpha, divergence, beta, ignore_index,
                                      label_smoothing, softcap, reduction, backend)
        self.options.update(tail=tail, scale_by_t2=scale_by_t2, backend=backend,
                            teacher_temperature=teacher_temperature)

    def forward(self, student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                teacher_topk_indices: torch.Tensor, target: Optional[torch.Tensor] = None,
                num_items_in_batch=None) -> torch.Tensor:
        return F.sparse_distillation_loss(student_logits, teacher_topk_logprobs,
                                          teacher_topk_indices, target,
                                          num_items_in_batch=num_items_in_batch,
                                          **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
