"""Weighted sum of per-teacher dense losses through any dense kernel, in two `[N, V]` buffers.

    rows = ce_weight * CE + sum_i div_weight * w_i * D(p_t_i, p_s)

Each teacher is streamed through the backend's kernel in turn: the first call writes the
student gradient (with the CE term), later calls write into one scratch buffer that is added
in. Peak memory is therefore two `[N, V]` gradients whatever the number of teachers, instead
of one saved gradient per teacher (or a stacked `[k, N, V]` copy).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .._kernel_args import KernelArgs
from .dense import consume_once


def _teacher_args(args: KernelArgs, index: int, weight: float) -> KernelArgs:
    """The scalars for teacher `index`: CE only once, D scaled by w_i."""
    return args._replace(ce_weight=args.ce_weight if index == 0 else 0.0,
                         div_weight=args.div_weight * weight)


def _run_teachers(student, teachers, target, kernel, args, weights, grad_student):
    scratch = torch.empty_like(student) if grad_student is not None and len(teachers) > 1 \
        else None
    rows = None
    for i, (teacher, weight) in enumerate(zip(teachers, weights)):
        buffer = grad_student if i == 0 else scratch
        r = kernel(student, teacher, target, buffer, None, None, _teacher_args(args, i, weight))
        rows = r if rows is None else rows + r
        if i > 0 and grad_student is not None:
            grad_student.add_(scratch)
    return rows


class MultiTeacherFunction(torch.autograd.Function):
    """Student-only gradient (teachers are constants), computed in the forward pass."""

    @staticmethod
    def forward(ctx, student, target, kernel: Callable, args: KernelArgs, weights: tuple,
                *teachers):
        grad_student = torch.empty_like(student)
        rows = _run_teachers(student, teachers, target, kernel, args, weights, grad_student)
        ctx.save_for_backward(grad_student)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        consume_once(ctx)
        (grad_student,) = ctx.saved_tensors
        grad_student = grad_student.mul_(grad_rows.unsqueeze(-1).to(grad_student.dtype))
        return (grad_student, None, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 5)


def multi_teacher_rows(student: torch.Tensor, teachers: Sequence[torch.Tensor],
                       target: Optional[torch.Tensor], kernel: Callable, args: KernelArgs,
                       weights: Sequence[float]) -> torch.Tensor:
    """(N, V), k x (N, V), (N,) | None -> (N,) rows, differentiable in the student only."""
    weights = tuple(float(w) for w in weights)
    if not (torch.is_grad_enabled() and student.requires_grad):
        return _run_teachers(student, teachers, target, kernel, args, weights, None)
    return MultiTeacherFunction.apply(student, target, kernel, args, weights, *teachers)
