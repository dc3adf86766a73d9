"""Autograd Function of the top-k (offline) teacher loss.

The kernel (contract of `fastkd.reference.sparse_kd_rows`) writes the gradient of the per-row
loss into an `(N, V)` buffer during the forward pass; backward rescales it per row, in place.
The stored teacher is a constant: it never receives a gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class SparseDistillationFunction(torch.autograd.Function):
    """rows = kernel(student, topk_logprobs, topk_indices, target, grad, *options)."""

    @staticmethod
    def forward(ctx, student, topk_logprobs, topk_indices, target, kernel: Callable,
                options: tuple):
        grad_student = torch.empty_like(student)
        rows = kernel(student, topk_logprobs, topk_indices, target, grad_student, *options)
        ctx.save_for_backward(grad_student)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        # Scaled in place to keep one (N, V) buffer: a second backward is refused.
        if getattr(ctx, "consumed", False):
            raise RuntimeError("fastkd: the top-k distillation loss's backward can run only "
                               "once per forward (its fused gradient is scaled in place)")
        ctx.consumed = True
        (grad_student,) = ctx.saved_tensors
        grad_student = grad_student.mul_(grad_rows.unsqueeze(-1).to(grad_student.dtype))
        return grad_student, None, None, None, None, None


def sparse_distillation_rows(student: torch.Tensor, topk_logprobs: torch.Tensor,
                             topk_indices: torch.Tensor, target: Optional[torch.Tensor],
                             kernel: Callable, options: tuple) -> torch.Tensor:
    """(N, V), (N, k), (N, k), (N,) | None -> (N,) rows, differentiable in student only."""
    if not (torch.is_grad_enabled() and student.requires_grad):
        with torch.no_grad():  # the stored teacher is a constant, even if it requires grad
            return kernel(student, topk_logprobs, topk_indices, target, None, *options)
    return SparseDistillationFunction.apply(student, topk_logprobs, topk_indices, target,
                                            kernel, options)
