"""Autograd Function of the top-k (offline) teacher loss, shared by every backend.

The kernel (contract of `fastkd.reference.sparse.sparse_kd_rows`: the reference, the fused C++
CPU op of `fastkd.ops.sparse_native` or the Triton op of `fastkd.ops.sparse_triton`) writes the
gradient of the per-row loss into an `(N, V)` buffer during the forward pass (the student's own
buffer with `inplace_backward`); backward rescales it per row, in place. The stored teacher is
a constant: it never receives a gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .dense import consume_once


class SparseDistillationFunction(torch.autograd.Function):
    """(rows, terms) = kernel(student, topk_logprobs, topk_indices, target, grad, *options)."""

    @staticmethod
    def forward(ctx, student, topk_logprobs, topk_indices, target, kernel: Callable,
                options: tuple, inplace_backward: bool, need_terms: bool):
        # In place: each row is overwritten by its gradient after its last read.
        grad_student = student if inplace_backward else torch.empty_like(student)
        terms = _terms_buffer(student) if need_terms else None
        rows = kernel(student, topk_logprobs, topk_indices, target, grad_student, *options,
                      terms=terms)
        ctx.save_for_backward(grad_student)
        if terms is None:
            return rows, None
        ctx.mark_non_differentiable(terms)
        return rows, terms

    @staticmethod
    def backward(ctx, grad_rows, grad_terms):
        consume_once(ctx)  # the fused gradient is scaled in place: one backward only
        (grad_student,) = ctx.saved_tensors
        grad_student = grad_student.mul_(grad_rows.unsqueeze(-1).to(grad_student.dtype))
        return grad_student, None, None, None, None, None, None, None


def _terms_buffer(student: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    return torch.empty(student.shape[0], 2, dtype=dtype, device=student.device)


def sparse_distillation_rows(student: torch.Tensor, topk_logprobs: torch.Tensor,
                             topk_indices: torch.Tensor, target: Optional[torch.Tensor],
                             kernel: Callable, options: tuple, *,
                             inplace_backward: bool = False, return_terms: bool = False):
    """Per-row loss of the top-k teacher loss, differentiable in the student only.

    Parameters
    ----------
    student : (N, V) floating, ``stride(1) == 1`` (any row stride).
    topk_logprobs : (N, k) floating; topk_indices : (N, k) int64 or int32.
    target : (N,) int64 or None.
    kernel : a callable with the contract of `fastkd.reference.sparse.sparse_kd_rows`.
    options : its scalar arguments from ``temperature`` to ``renormalize``.
    inplace_backward : write the gradient into ``student``'s own buffer (its values are lost).
    return_terms : also return the unweighted per-row (CE, D), detached.

    Returns
    -------
    rows : (N,) float32 (float64 for float64 students); with ``return_terms`` the pair
    ``(rows, terms)``, terms (N, 2) of the same dtype.
    """
    if not (torch.is_grad_enabled() and student.requires_grad):
        with torch.no_grad():  # the stored teacher is a constant, even if it requires grad
            terms = _terms_buffer(student) if return_terms else None
            rows = kernel(student, topk_logprobs, topk_indices, target, None, *options,
                          terms=terms)
        return (rows, terms) if return_terms else rows
    rows, terms = SparseDistillationFunction.apply(student, topk_logprobs, topk_indices, target,
                                                   kernel, options, inplace_backward,
                                                   return_terms)
    return (rows, terms) if return_terms else rows
