"""The one autograd Function behind every dense distillation backend.

Each backend supplies a *kernel* with the contract of `fastkd.reference.dense_kd_rows`:
it reads student/teacher logits `(N, V)` once per pass, writes the gradient of the per-row
weighted loss into preallocated `(N, V)` buffers during the forward pass, and returns the
per-row loss `(N,)` in float32. Backward is then a per-row rescale by the incoming gradient:
no second sweep over the logits and no `[N, V]` temporaries.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def consume_once(ctx) -> None:
    """Marks a fused-gradient Function's saved gradient as consumed.

    The stored gradients are scaled in place in backward to keep peak memory at one [N, V]
    buffer, so a second backward through the same graph is refused rather than silently
    rescaling twice.
    """
    if getattr(ctx, "consumed", False):
        raise RuntimeError("fastkd: the distillation loss's backward can run only once per "
                           "forward (its fused gradient is scaled in place)")
    ctx.consumed = True


class DenseDistillationFunction(torch.autograd.Function):
    """rows = kernel(...); d rows / d logits is computed by the kernel in the forward pass."""

    @staticmethod
    def forward(ctx, student, teacher, target, kernel: Callable, options: tuple,
                need_student_grad: bool, need_teacher_grad: bool, inplace_backward: bool):
        if inplace_backward and need_student_grad:
            grad_student = student  # overwritten row by row after its last read
        elif need_student_grad:
            grad_student = torch.empty_like(student)
        else:
            grad_student = None
        grad_teacher = torch.empty_like(teacher) if need_teacher_grad else None
        rows = kernel(student, teacher, target, grad_student, grad_teacher, *options)
        ctx.save_for_backward(grad_student, grad_teacher)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        consume_once(ctx)
        grad_student, grad_teacher = ctx.saved_tensors
        scale = grad_rows.unsqueeze(-1)
        if grad_student is not None:
            grad_student = grad_student.mul_(scale.to(grad_student.dtype))
        if grad_teacher is not None:
            grad_teacher = grad_teacher.mul_(scale.to(grad_teacher.dtype))
        return grad_student, grad_teacher, None, None, None, None, None, None


def dense_distillation_rows(student: torch.Tensor, teacher: torch.Tensor,
                            target: Optional[torch.Tensor], kernel: Callable, options: tuple,
                            inplace_backward: bool = False) -> torch.Tensor:
    """(N, V), (N, V), (N,) | None -> (N,) rows, differentiable in student and teacher."""
    grad_on = torch.is_grad_enabled()
    need_s = grad_on and student.requires_grad
    need_t = grad_on and teacher.requires_grad
    if not (need_s or need_t):
        return kernel(student, teacher, target, None, None, *options)
    return DenseDistillationFunction.apply(student, teacher, target, kernel, options,
                                           need_s, need_t, inplace_backward)
