"""`nn.Module` wrappers of the functional losses: keywords fixed at construction."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F
from ._validation import check_options


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
        self.options = dict(temperature=temperature, alpha=alpha, divergence=divergence,
                            beta=beta, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, softcap=softcap,
                            reduction=reduction)
        check_options(**self.options, num_items_in_batch=None)
        self.options.update(scale_by_t2=scale_by_t2, backend=backend,
                            inplace_backward=inplace_backward)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None, num_items_in_batch=None) -> torch.Tensor:
        return F.distillation_loss(student_logits, teacher_logits, target,
                                   num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
