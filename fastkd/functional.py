"""Public functional API: validation, flattening, backend resolution, weighting, reduction."""

from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import dense_kernel, resolve_backend
from ._validation import (
    check_floating,
    check_options,
    check_same_device,
    check_target,
    reduce_rows,
)
from .ops import dense_distillation_rows
from .reference import DIVERGENCES


def loss_weights(target_given: bool, alpha: float, temperature: float,
                 scale_by_t2: bool) -> tuple:
    """(ce_weight, div_weight) of `alpha * CE + (1 - alpha) * k * D`, k = T^2 or 1.

    With no target there is no hard term and the loss is `k * D` (alpha unused).
    """
    k = float(temperature) ** 2 if scale_by_t2 else 1.0
    if not target_given:
        return 0.0, k
    return float(alpha), (1.0 - float(alpha)) * k


def check_logits_pair(student_logits, teacher_logits, target) -> None:
    check_floating("student_logits", student_logits)
    check_floating("teacher_logits", teacher_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (..., V)")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must equal "
                         f"student_logits shape {tuple(student_logits.shape)} (same tokens "
                         "and vocabulary; pad the smaller vocabulary with -inf)")
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(f"teacher_logits dtype {teacher_logits.dtype} must equal "
                        f"student_logits dtype {student_logits.dtype}")
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits,
                      target=target)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Hinton-style distillation loss `alpha * CE + (1 - alpha) * T^2 * D(p_t, p_s)`.

    student_logits, teacher_logits: (..., V) of one floating dtype; target: (...) int64 or
    None. Returns a scalar, or (...) for reduction="none"; float32 for fp32/bf16/fp16 inputs
    and float64 for float64 inputs. See DESIGN.md §1 for the exact semantics.

    inplace_backward=True writes the gradient into student_logits' buffer (saving one
    (N, V) tensor): the logits' values are destroyed, so use it only when nothing else
    reads them after this call (e.g. logits straight from the lm-head).
    """
    check_logits_pair(student_logits, teacher_logits, target)
    check_options(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                  ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                  reduction=reduction, num_items_in_batch=num_items_in_batch)
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if target is not None:
        check_target(target, lead_shape, vocab, ignore_index)
    name = resolve_backend(backend, student_logits)

    student = student_logits.reshape(-1, vocab).contiguous()
    teacher = teacher_logits.reshape(-1, vocab).contiguous()
    flat_target = None if target is None else target.reshape(-1).to(torch.int64)
    ce_weight, div_weight = loss_weights(target is not None, alpha, temperature, scale_by_t2)
    options = (float(temperature), ce_weight, div_weight, DIVERGENCES.index(divergence),
               float(beta), int(ignore_index), float(label_smoothing),
               float(softcap) if softcap is not None else 0.0)
    rows = dense_distillation_rows(student, teacher, flat_target, dense_kernel(name), options,
                                   inplace_backward=inplace_backward)
    valid = None if flat_target is None else (flat_target != ignore_index).sum()
    return reduce_rows(rows, valid, reduction, num_items_in_batch, lead_shape)
